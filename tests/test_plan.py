"""Plans without weights: ``compress plan CONFIG --stats DIR`` and ``prune --dry-run --stats`` build the model on
the meta device from its config alone (the published Qwen3-Next-80B-A3B config, synthetic statistics)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from conftest import FIXTURE, invoke

from compressor.calibration import StateStatistics
from compressor.metrics import METRICS

CONFIGS = Path(__file__).parent / "configs"


def synthetic_stats(folder: Path, layers: list[int], heads: int, shape: tuple[int, int]) -> Path:
    """Statistics of the right shape for a model (random metrics; three time steps)."""
    generator = torch.Generator().manual_seed(0)
    mean = {name: torch.rand(3, len(layers), heads, generator=generator) * 50 for name in METRICS}
    StateStatistics(mean=mean, std={name: torch.zeros_like(v) for name, v in mean.items()},
                    times=torch.tensor([64, 128, 256]), layers=layers, heads=[heads] * len(layers),
                    state_shapes=[shape] * len(layers), settings={"eps": 1e-4, "samples": 4, "seq_len": 256,
                                                                   "tokens": 1024, "source": "synthetic"}).save(folder)
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
