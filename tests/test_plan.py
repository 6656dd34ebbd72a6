"""Plans without weights: ``compress plan CONFIG --stats DIR`` and ``prune --dry-run --stats`` build the model on
the meta device from its config alone (the published Qwen3-Next-80B-A3B config, synthetic statistics)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from conftest import FIXTURE, invoke

from compressor.calibration import StateStatistics

CONFIGS = Path(__file__).parent / "configs"


def synthetic_stats(folder: Path, layers: list[int], heads: int, shape: tuple[int, int]) -> Path:
    """Statistics of the right shape for a model (random metrics; three time steps)."""
    StateStatistics.synthetic(layers, [heads] * len(layers), [shape] * len(layers)).save(folder)
    return folder


def test_the_80b_plan_needs_no_weights_and_its_sizes_are_the_hand_computed_ones(tmp_path):
    config = CONFIGS / "qwen3_next_80b_a3b" / "config.json"
    linear = [i for i in range(48) if (i + 1) % 4]  # every 4th layer is full attention: 36 Gated DeltaNet layers
    stats = synthetic_stats(tmp_path / "stats", linear, 32, (128, 128))
    result = invoke("plan", config, "--stats", stats, "--layout", "stock", "--state-reduction", 0.389)
    assert result.exit_code == 0, result.output
    # stock: 16 key heads x 2 value heads; keeping at most 61.1 % of 32 -> 9 key heads x 2 = 18 value heads
    rows = re.findall(r"^\s*(\d+)\s+32 -> (\d+)\s", result.stdout, re.M)
    assert [int(layer) for layer, _ in rows] == linear and {kept for _, kept in rows} == {"18"}
    head_state = 128 * 128 * 2  # bf16
    assert f"{36 * 32 * head_state:,} -> {36 * 18 * head_state:,} bytes" in result.stdout
    # each removed key head takes q, k (2 x 128 rows) and its 2 value heads' v, z (4 x 128 rows) of in_proj_qkvz,
    # 4 rows of in_proj_ba (all x 2048 inputs), 512 conv channels of width 4, 2 A_log and 2 dt_bias entries,
    # and 256 columns of out_proj (x 2048 outputs): 7 key heads in each of 36 layers
    per_key_head = 768 * 2048 + 4 * 2048 + 512 * 4 + 4 + 256 * 2048
    before, after = map(lambda s: int(s.replace(",", "")),
                        re.search(r"parameters: ([\d,]+) -> ([\d,]+)", result.stdout).groups())
    assert before - after == 36 * 7 * per_key_head
    shards = re.search(r"output: (\d+) shard\(s\) of ([\d., ]+) GiB \(([\d.]+) GiB of weights\)", result.stdout)
    sizes = [float(size) for size in shards[2].split(", ")]
    assert len(sizes) == int(shards[1]) and max(sizes) <= 2.0
    assert abs(float(shards[3]) - after * 2 / 2**30) < 0.02


def test_a_dry_run_from_saved_statistics_reads_no_weights(tmp_path):
    source = tmp_path / "config-only"
    source.mkdir()
    shutil.copyfile(FIXTURE / "config.json", source / "config.json")
    stats = synthetic_stats(tmp_path / "stats", [0, 1, 3, 4], 8, (32, 32))
    result = invoke("prune", source, "--dry-run", "--stats", stats, "--method", "norm")
    assert result.exit_code == 0, result.output
    assert "65,536 -> 38,912 bytes" in result.stdout
    assert sorted(p.name for p in source.iterdir()) == ["config.json"]


def test_plan_refuses_a_method_that_needs_the_weights(tmp_path):
    result = invoke("plan", CONFIGS / "qwen3_next_80b_a3b", "--stats", tmp_path, "--method", "auto")
    assert result.exit_code == 2 and "auto" in result.output
    assert json.loads((CONFIGS / "qwen3_next_80b_a3b" / "config.json").read_text())["model_type"] == "qwen3_next"


def plan_figures(output: str) -> tuple[list[tuple[int, int, int]], int, int, int, int, list[float]]:
    """(layer, heads before, heads kept) rows, state bytes before/after, parameters before/after, shard GiB (and
    their total, last)."""
    rows = [tuple(map(int, row)) for row in re.findall(r"^\s*(\d+)\s+(\d+) -> (\d+)\s", output, re.M)]
    state = re.search(r"state per sequence: ([\d,]+) -> ([\d,]+) bytes", output).groups()
    params = re.search(r"parameters: ([\d,]+) -> ([\d,]+)", output).groups()
    shards = re.search(r"output: (\d+) shard\(s\) of ([\d., ]+) GiB \(([\d.]+) GiB of weights\)", output)
    sizes = [float(size) for size in shards[2].split(", ")]
    assert len(sizes) == int(shards[1]) and abs(sum(sizes) - float(shards[3])) <= 0.005 * len(sizes) + 0.005
    return rows, *(int(v.replace(",", "")) for v in (*state, *params)), [*sizes, float(shards[3])]


def test_the_397b_qwen3_5_moe_plan_needs_no_weights_and_its_sizes_are_the_hand_computed_ones(tmp_path):
    """Qwen3.5-397B-A17B (tests/configs/README.md): 60 layers, every 4th full attention; 45 Gated DeltaNet layers
    of 16 key heads x 4 value heads (d 128); 512 experts of 1024 and a shared one of 1024 in every layer."""
    linear = [i for i in range(60) if (i + 1) % 4]
    stats = synthetic_stats(tmp_path / "stats", linear, 64, (128, 128))
    result = invoke("plan", CONFIGS / "qwen3_5_397b_a17b", "--stats", stats, "--layout", "stock",
                    "--state-reduction", 0.389)
    assert result.exit_code == 0, result.output
    rows, state_before, state_after, before, after, shards = plan_figures(result.stdout)
    # stock: k key heads x q value heads with k q <= 61.1 % of 64 = 39.1, the most state kept: 13 x 3 = 39
    assert rows == [(layer, 64, 39) for layer in linear]
    head_state = 128 * 128 * 2  # bf16
    assert (state_before, state_after) == (45 * 64 * head_state, 45 * 39 * head_state)
    hidden, vocab, experts = 4096, 248320, 512
    moe = experts * 3 * 1024 * hidden + experts * hidden + 3 * 1024 * hidden + hidden  # experts, router, shared
    gated_deltanet = ((2 * 16 * 128 + 64 * 128) * hidden + 64 * 128 * hidden + 2 * 64 * hidden  # qkv, z, b, a
                      + (2 * 16 * 128 + 64 * 128) * 4 + 2 * 64 + 128 + hidden * 64 * 128)  # conv, A, dt, norm, out
    attention = hidden * 32 * 256 * 2 + 2 * hidden * 2 * 256 + 32 * 256 * hidden + 2 * 256  # gated q, k, v, o, norms
    total = 2 * vocab * hidden + hidden + 60 * (moe + 2 * hidden) + 45 * gated_deltanet + 15 * attention
    assert before == total
    # a removed key head: its q and k rows (2 x 128 x 4096) and conv channels; a removed value head: v and z rows,
    # b and a rows, conv channels, A_log and dt_bias, out_proj columns; 3 key heads and 25 value heads per layer
    per_key_head = 2 * 128 * hidden + 2 * 128 * 4
    per_value_head = 2 * 128 * hidden + 2 * hidden + 128 * 4 + 2 + 128 * hidden
    assert before - after == 45 * (3 * per_key_head + 25 * per_value_head)
    # the experts of one layer are two tensors of 8 and 4 GiB: each is a shard of its own
    assert shards.count(8.0) == shards.count(4.0) == 60
    assert abs(shards[-1] - after * 2 / 2**30) < 0.01  # bf16; the rotary frequencies are not saved


def test_the_48b_kimi_linear_plan_needs_no_weights_and_its_sizes_are_the_hand_computed_ones(tmp_path):
    """Kimi-Linear-48B-A3B: 27 layers, MLA at (1-based) 4, 8, ..., 24 and 27; 20 KDA layers of 32 heads of d 128;
    a dense MLP in layer 0, 256 experts of 1024 and a shared one after."""
    kda = [i for i in range(27) if i + 1 not in (4, 8, 12, 16, 20, 24, 27)]
    stats = synthetic_stats(tmp_path / "stats", kda, 32, (128, 128))
    result = invoke("plan", CONFIGS / "kimi_linear_48b_a3b", "--stats", stats, "--layout", "stock",
                    "--state-reduction", 0.389)
    assert result.exit_code == 0, result.output
    rows, state_before, state_after, before, after, shards = plan_figures(result.stdout)
    assert rows == [(layer, 32, 19) for layer in kda]  # one key head per value head: 19 <= 61.1 % of 32
    head_state = 128 * 128 * 2
    assert (state_before, state_after) == (20 * 32 * head_state, 20 * 19 * head_state)
    hidden, vocab, width = 2304, 163840, 32 * 128
    kda_layer = (3 * width * hidden + 3 * width * 4 + width + 32  # q, k, v, conv, dt_bias, A_log
                 + 2 * (128 * hidden + width * 128) + 32 * hidden + 128 + hidden * width)  # f, g, b, o_norm, o
    mla_layer = 32 * 192 * hidden + 576 * hidden + 512 + 32 * 256 * 512 + hidden * width
    moe = 256 * 3 * 1024 * hidden + 256 * hidden + 3 * 1024 * hidden
    total = (2 * vocab * hidden + hidden + 27 * 2 * hidden + 3 * 9216 * hidden + 26 * moe
             + 20 * kda_layer + 7 * mla_layer)
    assert before == total
    per_head = 3 * 128 * hidden + 3 * 128 * 4 + 128 + 1 + 128 * 128 + hidden + 128 * 128 + 128 * hidden
    assert before - after == 20 * 13 * per_head
    assert abs(shards[-1] - after * 2 / 2**30) < 0.01  # and 26 x 256 expert score biases


def test_the_weightless_plans_of_the_published_configs_take_seconds(tmp_path):
    import time

    kda = [i for i in range(27) if i + 1 not in (4, 8, 12, 16, 20, 24, 27)]
    for name, layers, heads in (("qwen3_5_397b_a17b", [i for i in range(60) if (i + 1) % 4], 64),
                                ("kimi_linear_48b_a3b", kda, 32),
                                ("qwen3_next_80b_a3b", [i for i in range(48) if (i + 1) % 4], 32)):
        stats = synthetic_stats(tmp_path / name, layers, heads, (128, 128))
        start = time.perf_counter()
        result = invoke("plan", CONFIGS / name, "--stats", stats)
        assert result.exit_code == 0, result.output
        assert time.perf_counter() - start < 10, name
