"""Calibration one decoder layer at a time (``compressor.sequential``): the same statistics, bit for bit on the CPU,
as the whole-model forward; ``prune`` with a memory limit below the model's size writes the same folder, with the
same evaluation, and checks it layer by layer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import EVAL_TEXT, FIXTURE, assert_user_error, invoke
from safetensors.torch import load_file
from tiny_hybrids import saved_tiny_hybrid
from synthetic import MEASURING_ENV, RSS, synthetic_source
from tiny_models import tiny_model

from compressor.calibration import collect_state_statistics
from compressor.loading import load_layer_by_layer, load_model


def saved_tiny_qwen3_next(folder: Path) -> Path:
    """A tiny grouped Qwen3-Next MoE (6 value heads over 3 key heads) in several shards, per-expert tensors."""
    tiny_model("qwen3_next_moe", vocab_size=8192).save_pretrained(folder, max_shard_size="400KB")  # the tokenizer's
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(FIXTURE / name, folder / name)
    return folder


SOURCES = {
    "fixture": lambda tmp: FIXTURE,
    "qwen3_next_moe": lambda tmp: saved_tiny_qwen3_next(tmp / "qwen3_next"),
    "kimi_linear": lambda tmp: saved_tiny_hybrid("kimi_linear", tmp / "kimi"),
}


@pytest.mark.parametrize(("name", "dtype"), [*((name, "auto") for name in sorted(SOURCES)),
                                           ("kimi_linear", "bfloat16")])  # its dt_bias and router stay float32
def test_layer_by_layer_statistics_are_the_whole_model_ones(name, dtype, tmp_path):
    source = SOURCES[name](tmp_path)
    whole = load_model(str(source), "cpu", dtype)
    tokens = torch.randint(3, whole.model.config.vocab_size, (5, 200), generator=torch.Generator().manual_seed(0))
    expected = collect_state_statistics(whole.model, whole.family, tokens, 2, progress=False, halves=True)
    streamed = load_layer_by_layer(str(source), "cpu", dtype, memory=2**20)
    assert all(p.device.type == "meta" for p in streamed.model.parameters())
    measured = collect_state_statistics(streamed.model, streamed.family, tokens, 2, progress=False, halves=True,
                                        layer_by_layer=streamed.layer_by_layer)
    assert all(p.device.type == "meta" for p in streamed.model.parameters())  # every layer given back
    assert streamed.layer_by_layer.hidden_device == torch.device("cpu")  # 1 MiB holds no hidden states
    for metric in expected.mean:
        for got, want in ((measured, expected), *zip(measured.halves, expected.halves)):
            assert torch.equal(got.mean[metric].nan_to_num(-1), want.mean[metric].nan_to_num(-1)), metric
            assert torch.equal(got.std[metric].nan_to_num(-1), want.std[metric].nan_to_num(-1)), metric
    assert expected.mean["threshold_rank"].nan_to_num().std() > 0  # the heads differ: a mix-up would show


def test_prune_below_the_memory_limit_writes_the_whole_model_folder(tmp_path):
    """``--max-cpu-memory`` of 4 MB for a 24 MB (float32) model: calibrated, evaluated and verified layer by layer,
    exported shard by shard; the same plan, config, tensors and evaluation as the whole-model run, and the reload
    check (the folder's logits against the source's pruned as each layer loads) passes."""
    common = ["--method", "norm", "--samples", "2", "--seq-len", "256", "--device", "cpu", "--max-shard-size", "4MB",
              "--eval", EVAL_TEXT, "--eval-samples", "3", "--eval-seq-len", "128"]
    whole = invoke("prune", FIXTURE, "--out", tmp_path / "whole", "--export", "stream", *common)
    limited = invoke("prune", FIXTURE, "--out", tmp_path / "limited", "--max-cpu-memory", "4MB", *common)
    assert whole.exit_code == 0 and limited.exit_code == 0, (whole.output, limited.output)
    tensors = {}
    for kind in ("whole", "limited"):
        tensors[kind] = {}
        for file in (tmp_path / kind).glob("*.safetensors"):
            tensors[kind].update(load_file(file))
    assert sorted(tensors["whole"]) == sorted(tensors["limited"])
    assert all(torch.equal(t, tensors["limited"][n]) for n, t in tensors["whole"].items())
    records = {kind: json.loads((tmp_path / kind / "compression.json").read_text()) for kind in tensors}
    assert records["whole"]["layers"] == records["limited"]["layers"]
    assert records["whole"]["params_after"] == records["limited"]["params_after"]
    assert records["whole"]["eval"] == records["limited"]["eval"]
    assert records["limited"]["eval"]["perplexity_after"] > records["limited"]["eval"]["perplexity_before"]
    assert records["limited"]["verify"] == {"max_abs_logit_diff": 0.0, "passed": True, "tokens": 512}
    assert json.loads((tmp_path / "whole" / "config.json").read_text()) == \
        json.loads((tmp_path / "limited" / "config.json").read_text())


def test_the_layer_by_layer_reload_check_catches_a_wrong_slice(tmp_path, monkeypatch):
    """The written folder with one head's rows of one layer swapped: the check fails and nothing is written."""
    import compressor.streaming

    original = compressor.streaming.read_tensor

    def swapped(file, name, kept):
        tensor = original(file, name, kept)
        if name == "model.layers.1.linear_attn.in_proj_z.weight":
            return torch.cat([tensor[32:64], tensor[:32], tensor[64:]])  # value heads 0 and 1 of 32 rows each
        return tensor

    monkeypatch.setattr(compressor.streaming, "read_tensor", swapped)
    result = invoke("prune", FIXTURE, "--out", tmp_path / "out", "--max-cpu-memory", "4MB", "--method", "norm",
                    "--samples", "2", "--seq-len", "256", "--device", "cpu", "--heads-per-layer", "0:4,1:4,3:4,4:4")
    assert_user_error(result, "verification failed")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "words"), [
    (["--method", "auto"], ["--method auto", "statistics score"]),
    (["--method", "loss"], ["--method loss"]),
    (["--method", "norm", "--key-reduction", "0.25"], ["--key-reduction", "drop the limit"]),
])
def test_steps_that_need_the_whole_model_are_refused_layer_by_layer(args, words, tmp_path):
    result = invoke("prune", FIXTURE, "--out", tmp_path / "out", "--max-cpu-memory", "4MB", *args)
    assert_user_error(result, *words)
    assert not (tmp_path / "out").exists()


def test_a_memory_limit_above_the_model_keeps_the_whole_model_path(tmp_path, monkeypatch):
    import compressor.pipeline

    monkeypatch.setattr(compressor.pipeline, "load_layer_by_layer", lambda *a, **k: pytest.fail("layer by layer"))
    result = invoke("analyze", FIXTURE, "--max-cpu-memory", "1GB", "--samples", "1", "--seq-len", "128",
                    "--device", "cpu")
    assert result.exit_code == 0, result.output


def test_a_bad_memory_size_is_one_sentence(tmp_path, no_model_load):
    result = invoke("prune", FIXTURE, "--out", tmp_path / "out", "--max-gpu-memory", "lots")
    assert_user_error(result, "--max-gpu-memory", "20GB")


MEASURE = RSS + """
import json, sys, torch
from pathlib import Path
from compressor.calibration import collect_state_statistics
from compressor.loading import load_layer_by_layer

loaded = load_layer_by_layer(sys.argv[1], "cpu", "auto", memory=2**27)
tokens = torch.randint(3, 1024, (4, 128), generator=torch.Generator().manual_seed(0))
Path("/proc/self/clear_refs").write_text("5")  # the peak RSS (VmHWM) starts again from here
before = rss("VmRSS")
stats = collect_state_statistics(loaded.model, loaded.family, tokens, 2, progress=False,
                                  layer_by_layer=loaded.layer_by_layer)
largest = loaded.layer_by_layer.largest_layer()
print(json.dumps({"before": before, "peak": rss("VmHWM"),
                  "largest": largest, "layers": stats.layers}))
"""


@pytest.mark.slow
def test_layer_by_layer_calibration_holds_one_layer_in_memory(tmp_path):
    """The synthetic 0.55 GB model of 8 layers of about 66 MB: calibrating it layer by layer grows the peak RSS by at
    most 2 x its largest layer (the tensors read, then loaded) + 64 MiB (hidden states, states, the loader's work),
    well under the model's size."""
    import subprocess
    import sys

    source = synthetic_source(tmp_path / "source")
    measured = subprocess.run([sys.executable, "-c", MEASURE, str(source)], capture_output=True, text=True,
                              check=True, env=MEASURING_ENV)
    rss = json.loads(measured.stdout.strip().splitlines()[-1])
    assert rss["layers"] == [0, 1, 2, 4, 5, 6]
    assert rss["peak"] - rss["before"] <= 2 * rss["largest"] + 2**26, rss


def test_analyze_below_the_memory_limit_writes_the_whole_model_statistics(tmp_path):
    common = ["--samples", "4", "--seq-len", "128", "--device", "cpu"]
    whole = invoke("analyze", FIXTURE, "--out", tmp_path / "whole", *common)
    limited = invoke("analyze", FIXTURE, "--out", tmp_path / "limited", "--max-cpu-memory", "4MB", *common)
    assert whole.exit_code == 0 and limited.exit_code == 0, (whole.output, limited.output)
    expected, measured = (load_file(tmp_path / kind / "stats.safetensors") for kind in ("whole", "limited"))
    assert sorted(expected) == sorted(measured)
    assert all(torch.equal(t.nan_to_num(-1), measured[n].nan_to_num(-1)) for n, t in expected.items())
    reports = [json.loads((tmp_path / kind / "report.json").read_text()) for kind in ("whole", "limited")]
    assert reports[0]["consistency"] == reports[1]["consistency"]  # the halves, from the same passes
