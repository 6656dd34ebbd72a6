"""The speed scripts' bookkeeping, without a GPU: models measured in turns, and the ratios ``check_families_gpu.py``
derives from its timings (a stand-in clock makes every call's time known)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).parents[1] / "scripts"


class StandIn:
    """A runner whose calls advance ``clock`` by ``cost`` seconds per prefill (a tenth per generated token)."""

    def __init__(self, name: str, cost: float, clock: list[float], calls: list[str]):
        self.name, self.cost, self.clock, self.calls = name, cost, clock, calls
        self.model = torch.nn.Linear(1, 1)

    def tokens(self, batch: int, length: int) -> tuple[int, int]:
        return batch, length

    def prefill(self, ids) -> None:
        self.calls.append(self.name)
        self.clock[0] += self.cost

    def generate(self, ids, new_tokens: int) -> None:
        self.clock[0] += self.cost * 0.1 * new_tokens


@pytest.fixture
def scripts(monkeypatch):
    """(bench_inference, check_families_gpu) with the GPU's synchronisation a no-op and a stand-in clock;
    ``profile_prefill_host`` compares no logits (its stand-in runners have none)."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_inference
    import check_families_gpu
    import profile_prefill_host

    monkeypatch.setattr(profile_prefill_host, "logits_against_stock", lambda stock, shipped, ids: "compared")

    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    monkeypatch.setattr(bench_inference, "profiled", lambda fn: {})
    return bench_inference, check_families_gpu, clock


def test_models_are_measured_in_turns_in_the_reverse_order_every_other_turn(scripts):
    bench_inference, _, clock = scripts
    calls: list[str] = []
    runners = {name: StandIn(name, cost, clock, calls) for name, cost in (("source", 2.0), ("heads", 1.5))}
    seconds = bench_inference.in_turns(runners, list(runners), 3,
                                       lambda name, runner: bench_inference.seconds_of(lambda: runner.prefill(None)))
    assert calls == ["source", "heads", "heads", "source", "source", "heads"]
    assert seconds == {"source": [2.0] * 3, "heads": [1.5] * 3}


def test_the_speed_phase_reports_the_folder_against_the_source(scripts, monkeypatch):
    """Every prefill ratio, the alternating one and its quartiles among them, is the folder's time over the
    source's (a swapped ratio would read 4/3)."""
    _, check_families_gpu, clock = scripts
    calls: list[str] = []
    runners = {name: StandIn(name, cost, clock, calls) for name, cost in (("source", 0.02), ("heads", 0.015))}
    monkeypatch.setattr(check_families_gpu, "speed_runners", lambda name, work: runners)
    monkeypatch.setattr(check_families_gpu, "PREFILL_ROUNDS", 3)
    monkeypatch.setattr(check_families_gpu, "PREFILL_PAIRS", 5)
    figures = check_families_gpu.measure_speed("stand-in", Path("unused"), decode_rounds=2)["heads"]
    assert len(figures["decode_b16_rounds_tok_s"]) == 2  # decoding in the first rounds only
    figures = check_families_gpu.measure_speed("stand-in", Path("unused"))["heads"]
    for key in ("prefill_time_ratio", "prefill_best_time_ratio", "prefill_paired_time_ratio",
                "prefill_alternating_time_ratio", "decode_time_ratio"):
        assert figures[key] == pytest.approx(0.75), key
    assert figures["prefill_alternating_quartiles"] == pytest.approx([0.75, 0.75])
    assert figures["prefill_4x2048_alternating_s"] == pytest.approx(0.015)
    assert len(figures["prefill_4x2048_rounds_s"]) == 3 and len(figures["decode_b16_rounds_tok_s"]) == 3
    rounds = calls[2 : 2 + 2 * 3 * 6]  # after the warm-up call of each: 3 rounds of 1 + 5 prefills per model
    assert rounds[::6] == ["source", "heads", "heads", "source", "source", "heads"], rounds
    monkeypatch.setattr(check_families_gpu, "PREFILL_BATCH", 16)  # --prefill-batch: the figures say which prefill
    assert "prefill_16x2048_alternating_s" in check_families_gpu.measure_speed("stand-in", Path("unused"))["heads"]
    assert calls[-10:] == ["source", "heads", "heads", "source"] * 2 + ["source", "heads"]  # the alternating turns


def test_the_gpu_time_of_a_profile_sums_kernels_not_the_range_around_them(scripts):
    """A ``record_function`` range shows on the device as a user annotation spanning its kernels: summed with them,
    the profile's GPU time would count that span on top of the kernels (about the call's wall time)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    bench_inference, _, _ = scripts
    kernel = SimpleNamespace(key="chunk_fwd_kernel_o", device_type=DeviceType.CUDA, is_user_annotation=False)
    span = SimpleNamespace(key=bench_inference.MEASURED, device_type=DeviceType.CUDA, is_user_annotation=True)
    operator = SimpleNamespace(key="aten::mm", device_type=DeviceType.CPU, is_user_annotation=False)
    assert bench_inference.on_device([operator, span, kernel]) == [kernel]


def test_profiles_list_the_kernels_with_the_most_gpu_time_and_launches(scripts):
    from types import SimpleNamespace

    bench_inference, _, _ = scripts
    kernels = [SimpleNamespace(key=name, count=count, self_device_time_total=us)
               for name, count, us in (("gather", 4, 2060.0), ("copy", 8, 770.0), ("norm", 3, 200.0))]
    assert bench_inference.most_gpu_time(kernels, 2) == [("gather", 2.06, 4), ("copy", 0.77, 8)]
    assert bench_inference.most_launched(kernels, 2) == [("copy", 8), ("gather", 4)]


def test_the_build_phase_without_a_build_folder_is_refused(tmp_path):
    out = tmp_path / "out" / "results.json"
    result = subprocess.run([sys.executable, str(SCRIPTS / "bench_inference.py"), "--phase", "build", "--out",
                             str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--phase build needs --build WORK" in result.stderr, result.stderr
    assert not out.parent.exists()


@pytest.mark.parametrize("option", ["--rounds", "--pairs", "--prefill-batch", "--fla-layers"])
def test_a_count_below_one_is_refused_before_anything_is_written(tmp_path, option):
    work, out = tmp_path / "work", tmp_path / "out" / "results.json"
    result = subprocess.run([sys.executable, str(SCRIPTS / "check_families_gpu.py"), "--work", str(work), "--out",
                             str(out), option, "0"], capture_output=True, text=True, timeout=120)
    message = "--rounds, --pairs, --prefill-batch and --fla-layers take positive counts"
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not work.exists() and not out.parent.exists()


@pytest.mark.parametrize("width", ["512", "1000"])
def test_an_fla_width_without_whole_head_pairs_is_refused_before_anything_is_written(tmp_path, width):
    work, out = tmp_path / "work", tmp_path / "out" / "results.json"
    result = subprocess.run([sys.executable, str(SCRIPTS / "check_families_gpu.py"), "--work", str(work), "--out",
                             str(out), "--fla-width", width], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"multiple of 256 from 768 (heads of 128, at least 3 in every family), not " \
        f"{width}" in result.stderr, result.stderr
    assert not work.exists() and not out.parent.exists()


def test_an_fla_group_that_does_not_divide_the_value_heads_is_refused_before_anything_is_written(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out" / "results.json"
    result = subprocess.run([sys.executable, str(SCRIPTS / "check_families_gpu.py"), "--work", str(work), "--out",
                             str(out), "--fla-group", "3"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--fla-group takes a divisor of the 8 value heads, not 3" in result.stderr
    assert not work.exists() and not out.parent.exists()


@pytest.mark.parametrize("group", [1, 2, 8])
def test_the_fla_group_sets_the_value_heads_per_key_head_of_gated_deltanet_and_kda(scripts, monkeypatch, group):
    pytest.importorskip("fla")  # registers fla's configs
    _, check_families_gpu, _ = scripts
    monkeypatch.setattr(check_families_gpu, "FLA_GROUP", group)
    for name in ("gated_deltanet", "kda"):
        config = check_families_gpu.config(name)
        assert (config.num_heads, config.num_v_heads, config.head_dim) == (8 // group, 8, 128)


@pytest.mark.parametrize("name", ["gated_deltanet", "kda", "delta_net", "gla"])
def test_the_narrowest_fla_models_keep_heads_of_128_and_a_valid_uneven_plan(scripts, monkeypatch, name):
    """At the narrowest width accepted, every fla model has heads of 128, as many as the width holds, and the
    uneven plan keeps in every layer distinct heads of the layer, not all of them and at least one."""
    pytest.importorskip("fla")
    _, check_families_gpu, _ = scripts
    from transformers import AutoModelForCausalLM

    from compressor.families import family_for
    from compressor.layers import linear_layers

    monkeypatch.setattr(check_families_gpu, "FLA_WIDTH", 768)
    monkeypatch.setattr(check_families_gpu, "FLA_LAYERS", 3)
    config = check_families_gpu.config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    mixers = linear_layers(model, family_for(config))
    assert config.hidden_size == 768 and len(mixers) == 3
    for mixer in mixers.values():
        assert (mixer.head_k_dim, mixer.head_v_dim, mixer.num_v_heads) == (128, 128, 3 if name == "gla" else 6)
    for index, kept in check_families_gpu.uneven_plan(model).items():
        heads = mixers[index].num_v_heads
        assert 0 < len(kept) < heads and kept == sorted(set(kept)) and set(kept) <= set(range(heads)), (index, kept)


@pytest.mark.parametrize("name, group", [("gated_deltanet", 2), ("kda", 4), ("gla", 2), ("gated_deltanet", 1),
                                         ("delta_net", 2)])
def test_the_fla_layout_plan_keeps_whole_key_groups_or_every_gla_head(scripts, monkeypatch, name, group):
    """``fla_layout``: grouped Gated DeltaNet and KDA lose one whole key group per layer, the next one in each (every
    kept key head keeps all its value heads: fla's own layout); GLA keeps every head and ``KEPT_CHANNELS``
    distinct query/key channels of each; ungrouped layers and DeltaNet get no such plan. Sliced by it, every layer
    is one that takes fla's layout on a GPU: r value heads under each key head in the stock grouping (j // r), or
    GLA's global head count."""
    pytest.importorskip("fla")
    _, check_families_gpu, _ = scripts
    from transformers import AutoModelForCausalLM

    from compressor.families import family_for
    from compressor.layers import PruningPlan, linear_layers
    from compressor.slicing import slim

    monkeypatch.setattr(check_families_gpu, "FLA_GROUP", group)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(check_families_gpu.config(name))
    plan = check_families_gpu.fla_layout_plan(model)
    if name == "delta_net" or group == 1:
        assert plan is None
        return
    kept, channels = plan
    family = family_for(model.config)
    mixers = linear_layers(model, family)
    if name == "gla":
        assert all(kept[index] == list(range(mixer.num_v_heads)) for index, mixer in mixers.items())
        assert all(len(set(c)) == len(c) == check_families_gpu.KEPT_CHANNELS
                   for layer in channels.values() for c in layer.values())
        assert {index: sorted(layer) for index, layer in channels.items()} == kept
    else:
        assert channels == {}
        lost = []
        for index, mixer in mixers.items():
            keys = sorted({mixer.value_to_key[h] for h in kept[index]})
            assert len(keys) == 8 // group - 1  # one key group gone
            assert kept[index] == [h for h in range(8) if mixer.value_to_key[h] in keys]  # each kept one whole
            lost.append(next(key for key in range(8 // group) if key not in keys))
        assert lost == [position % (8 // group) for position in range(3)]  # another in each layer, in turn
    slim(model, family, PruningPlan(kept=kept, channels=channels))  # what the GPU's layout asks of the layers
    for mixer in linear_layers(model, family).values():
        if name == "gla":
            assert mixer.num_heads == mixer.token_major_heads == 4 and not mixer.use_short_conv
        else:
            assert (mixer.num_k_heads, mixer.num_v_heads) == (8 // group - 1, 8 - group)
            assert mixer.value_to_key == [j // group for j in range(8 - group)] and mixer.normalises_convolved_keys


def test_count_launches_counts_each_family_in_a_process_of_its_own(monkeypatch):
    """Several families: one child process per family, each given that family alone (in one process, caches of an
    earlier family are evicted and a later one's counts rise); nothing is counted in the parent."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import count_launches

    children = []

    def child(argv):
        children.append(argv)
        return subprocess.CompletedProcess(argv, 3 if argv[-1] == "kda_gva" else 0)

    monkeypatch.setattr(count_launches.subprocess, "run", child)
    monkeypatch.setattr(count_launches, "models", lambda name: pytest.fail("the parent counted a family"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(sys, "argv", ["count_launches.py", "--families", "gla,delta_net", "--length", "32"])
    count_launches.main()
    assert [argv[-2:] for argv in children] == [["--families", "gla"], ["--families", "delta_net"]]  # the last wins
    assert all(argv[1] == count_launches.__file__ and argv[2:6] == sys.argv[1:] for argv in children)
    monkeypatch.setattr(sys, "argv", ["count_launches.py", "--families", "kda_gva,gla"])
    with pytest.raises(SystemExit, match="counting kda_gva failed \\(exit status 3;"):  # one sentence, no traceback
        count_launches.main()
    assert children[-1][-1] == "kda_gva"  # no family after the failed one


def test_profile_prefill_host_times_every_variant_in_turns_and_reports_its_ratio_to_the_source(
        scripts, monkeypatch, tmp_path):
    """``--rounds 2 --no-profile``: each round times ten prefills of every variant, in reversed order every other
    round; each variant's line gives its time over the source's per round and their median (a swapped ratio would
    read 1.25 or 2); only the log is written."""
    _, check_families_gpu, clock = scripts
    import compressor
    import profile_prefill_host

    calls: list[str] = []
    costs = (("source", 0.010), ("heads", 0.008), ("channels", 0.005))
    monkeypatch.setattr(check_families_gpu, "speed_runners",
                        lambda name, work: {name: StandIn(name, cost, clock, calls) for name, cost in costs})
    monkeypatch.setattr(profile_prefill_host, "Runner", lambda folder: StandIn("source_shipped", 0.009, clock, calls))
    monkeypatch.setattr(compressor, "register", lambda: None)
    monkeypatch.setattr(sys, "argv", ["profile_prefill_host.py", "--work", str(tmp_path / "work"), "--out-dir",
                                      str(tmp_path / "out"), "--rounds", "2", "--no-profile"])
    profile_prefill_host.main()
    order = ["source", "heads", "channels", "source_shipped"]
    assert calls[12:] == [name for name in order for _ in range(10)] + [name for name in order[::-1] for _ in range(10)]
    log = (tmp_path / "out" / "profile_prefill_host_qwen3_5.log").read_text().splitlines()
    assert log[-3:] == ["heads / source: 0.800 0.800 (median 0.800)", "channels / source: 0.500 0.500 (median 0.500)",
                        "source_shipped / source: 0.900 0.900 (median 0.900)"]
    assert "source_shipped vs source logits, bf16, 4 x 2048 tokens: compared" in log
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["profile_prefill_host_qwen3_5.log"]


def test_profile_prefill_host_compares_the_shipped_classs_logits_with_the_stock_ones(monkeypatch):
    """Two models of the same weights: no difference and every argmax equal; one logit of one position moved past
    the others and one of another moved down: the largest and mean absolute difference, the stock model's scale, and
    one position in eight whose argmax differs."""
    import types

    monkeypatch.syspath_prepend(str(SCRIPTS))
    import profile_prefill_host

    logits = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0))
    moved = logits.clone()
    moved[1, 2, moved[1, 2].argmin()] += 100
    moved[0, 1, moved[0, 1].argmin()] -= 50  # the argmax stays

    def model(values):
        return lambda ids: types.SimpleNamespace(logits=values[ids])

    ids = torch.tensor([0, 1])
    same = profile_prefill_host.logits_against_stock(model(logits), model(logits.clone()), ids)
    scale = logits.abs().max().item()
    assert same == f"max difference 0, mean 0, logit scale {scale:.3g}, argmax equal at 100.00% of positions"
    differing = profile_prefill_host.logits_against_stock(model(logits), model(moved), ids)
    assert differing == f"max difference 100, mean 3.75, logit scale {scale:.3g}, argmax equal at 87.50% of positions"


def test_profile_prefill_host_compares_each_variants_kernels_with_the_sources(scripts, monkeypatch, tmp_path):
    """``--kernels``: one profiled prefill per variant; each variant's launches and GPU time, and the kernels whose
    GPU time differs most from the source's, largest difference first, a kernel that only one of them runs at 0 ms
    in the other; the source lists none."""
    _, check_families_gpu, clock = scripts
    import compressor
    import profile_prefill_host

    calls: list[str] = []
    costs = (("source", 0.010), ("heads", 0.008))
    monkeypatch.setattr(check_families_gpu, "speed_runners",
                        lambda name, work: {name: StandIn(name, cost, clock, calls) for name, cost in costs})
    monkeypatch.setattr(profile_prefill_host, "Runner", lambda folder: StandIn("source_shipped", 0.009, clock, calls))
    monkeypatch.setattr(compressor, "register", lambda: None)
    kernels = {"source": {"chunk": (2.0, 3), "gate": (0.5, 3), "norm": (0.25, 3)},
               "heads": {"chunk": (1.5, 3), "gate": (0.5, 3), "copy": (0.125, 3)},
               "source_shipped": {"chunk": (2.0, 3), "gate": (0.75, 3), "norm": (0.25, 3)}}

    def kernel_times(prefill):
        prefill()
        return kernels[calls[-1]]

    monkeypatch.setattr(profile_prefill_host, "kernel_times", kernel_times)
    monkeypatch.setattr(sys, "argv", ["profile_prefill_host.py", "--work", str(tmp_path / "work"), "--out-dir",
                                      str(tmp_path / "out"), "--rounds", "1", "--no-profile", "--kernels"])
    profile_prefill_host.main()
    report = json.loads((tmp_path / "out" / "profile_prefill_host_qwen3_5_kernels.json").read_text())
    assert report["source"] == {"launches": 9, "gpu_ms": 2.75}
    assert report["heads"]["gpu_ms"] == 2.125 and report["heads"]["differing_from_source"] == [
        ["chunk", 1.5, 2.0], ["norm", 0.0, 0.25], ["copy", 0.125, 0.0], ["gate", 0.5, 0.5]]
    assert report["source_shipped"]["differing_from_source"][0] == ["gate", 0.75, 0.5]
    log = (tmp_path / "out" / "profile_prefill_host_qwen3_5.log").read_text()
    assert "source_shipped kernels: 9 launches, GPU 3.000 ms per prefill" in log and "-0.500 ms  chunk" in log


@pytest.mark.parametrize("arguments, message", [(["--rounds", "0"], "--rounds must be at least 1"),
                                                (["--no-profile"], "will not overwrite"),
                                                (["--fla-group", "3"], "--fla-group takes a divisor of the 8 value")])
def test_profile_prefill_host_refuses_a_bad_count_and_an_existing_log(tmp_path, arguments, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "profile_prefill_host_qwen3_5.log").write_text("an earlier run's figures\n")
    result = subprocess.run([sys.executable, str(SCRIPTS / "profile_prefill_host.py"), "--work", str(tmp_path / "work"),
                             "--out-dir", str(out), *arguments], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert (out / "profile_prefill_host_qwen3_5.log").read_text() == "an earlier run's figures\n"
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("variants, expected", [("", ()), ("channels", ("channels",)), ("heads,bogus", None)])
def test_profile_prefill_host_profiles_only_the_variants_asked_for(scripts, monkeypatch, tmp_path, variants,
                                                                   expected):
    """``--variants``: the pruned folders ``speed_runners`` builds runners for (none: the source and the shipped
    class only); a variant it does not know is refused before anything is written."""
    _, check_families_gpu, clock = scripts
    import compressor
    import profile_prefill_host

    seen, calls = [], []
    monkeypatch.setattr(check_families_gpu, "SPEED_VARIANTS", check_families_gpu.SPEED_VARIANTS)  # restored after
    monkeypatch.setattr(check_families_gpu, "FLA_GROUP", check_families_gpu.FLA_GROUP)
    monkeypatch.setattr(check_families_gpu, "speed_runners", lambda name, work: seen.append(
        (check_families_gpu.SPEED_VARIANTS, check_families_gpu.FLA_GROUP))
        or {"source": StandIn("source", 0.01, clock, calls)})
    monkeypatch.setattr(profile_prefill_host, "Runner", lambda folder: StandIn("source_shipped", 0.009, clock, calls))
    monkeypatch.setattr(compressor, "register", lambda: None)
    monkeypatch.setattr(sys, "argv", ["profile_prefill_host.py", "--work", str(tmp_path / "work"), "--out-dir",
                                      str(tmp_path / "out"), "--rounds", "1", "--no-profile", "--variants", variants,
                                      "--fla-group", "4"])
    if expected is None:
        with pytest.raises(SystemExit):
            profile_prefill_host.main()
        assert seen == [] and not (tmp_path / "out").exists()
    else:
        profile_prefill_host.main()
        assert seen == [(expected, 4)]  # the models are built with the value heads per key head asked for


def test_tune_project_kernels_refuses_an_unknown_case_by_name(monkeypatch, tmp_path, capsys):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import tune_project_kernels

    monkeypatch.setattr(sys, "argv", ["tune_project_kernels.py", "--out", str(tmp_path / "t.json"), "--cases",
                                      "channel_gate,gates,conv"])
    with pytest.raises(SystemExit):
        tune_project_kernels.main()
    assert "unknown cases: conv, gates" in capsys.readouterr().err and not (tmp_path / "t.json").exists()


DIVIDING_KERNEL = '''
import triton
import triton.language as tl


@triton.jit
def divide(x, out, n, WIDE: tl.constexpr):
    i = tl.program_id(0) * 128 + tl.arange(0, 128)
    if WIDE:
        i = i.to(tl.int64)
    tl.store(out + i, tl.load(x + i // n + i % n))
'''


def test_count_instructions_counts_the_subroutine_calls_of_a_64_bit_division(monkeypatch, tmp_path):
    """``count_instructions.py`` on a kernel that divides its 128 indices by a runtime integer: in int64 each
    division is a call to a subroutine (and more instructions), in int32 inline."""
    pytest.importorskip("triton")
    monkeypatch.syspath_prepend(str(SCRIPTS))
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "dividing_kernel.py").write_text(DIVIDING_KERNEL)
    import count_instructions
    from dividing_kernel import divide

    types = dict(x="*fp32", out="*fp32", n="i32")
    wide, narrow = (count_instructions.sass_counts(divide, types, {"WIDE": wide}, num_warps=1, values=128)
                    for wide in (True, False))
    assert wide["calls"] >= 1 and narrow["calls"] == 0, (wide, narrow)
    assert wide["instructions"] > narrow["instructions"] and narrow["values_per_thread"] == 4
