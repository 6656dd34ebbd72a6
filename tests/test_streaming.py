"""The streaming export (``compressor.streaming``) writes, shard by shard from the source's files, the tensors,
shards and index that ``save_pretrained`` of the pruned model writes; its memory holds one output shard."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURE, assert_user_error, invoke
from safetensors.torch import load_file
from synthetic import MEASURING_ENV, RSS, synthetic_source
from tiny_hybrids import saved_tiny_hybrid, tiny_hybrid
from tiny_models import PLANS, tiny_model

from compressor.export import cast_parameters, parameter_dtypes, write_model
from compressor.families import family_for
from compressor.layers import PruningPlan, linear_layers
from compressor.loading import load_structure
from compressor.slicing import slim
from compressor.streaming import Slice, output_tensors, write_weights


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def assert_same_weights(memory: Path, streamed: Path) -> None:
    """Same tensor names, dtypes and bytes, same shard files and index."""
    expected, written = folder_tensors(memory), folder_tensors(streamed)
    assert sorted(expected) == sorted(written)
    for name, tensor in expected.items():
        assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor), name
    files = lambda folder: sorted(p.name for p in folder.glob("model*.safetensors"))  # noqa: E731
    assert files(memory) == files(streamed)
    index = "model.safetensors.index.json"
    if (memory / index).exists():
        assert json.loads((memory / index).read_text()) == json.loads((streamed / index).read_text())


MODELS = {
    "qwen3_next_moe": lambda: tiny_model("qwen3_next_moe"),  # grouped in_proj_qkvz, per-expert checkpoint tensors
    "qwen3_next_dense": lambda: tiny_model("qwen3_next_dense"),
    "qwen3_5": lambda: tiny_model("qwen3_5"),
    "qwen3_5_moe": lambda: tiny_hybrid("qwen3_5_moe"),
    "gated_deltanet_gva": lambda: tiny_fla("gated_deltanet_gva"),
    "gla": lambda: tiny_fla("gla_conv_relu"),
    "kda_gva": lambda: tiny_fla("kda_gva"),
}


def tiny_fla(name: str) -> torch.nn.Module:
    pytest.importorskip("fla")
    from tiny_fla import tiny_fla_model

    return tiny_fla_model(name)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_streamed_weights_are_the_in_memory_ones(name, tmp_path):
    from transformers import AutoModelForCausalLM

    source, memory, streamed = tmp_path / "source", tmp_path / "memory", tmp_path / "streamed"
    MODELS[name]().save_pretrained(source, max_shard_size="100KB")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)  # as prune loads it
    plan = PLANS["uneven"] if name.startswith(("qwen", "olmo")) else fla_plan(name)
    family = family_for(model.config)
    removed = {i: sorted(set(range(m.num_v_heads)) - set(plan[i])) for i, m in linear_layers(model, family).items()}
    slim(model, family, PruningPlan(kept=dict(plan)))
    cast_parameters(model, torch.float32)
    write_model(model, family, memory.mkdir() or memory, "100KB")
    streamed.mkdir()
    weight_map = write_weights(source, load_structure(str(source)), PruningPlan(kept=dict(plan)), streamed, "100KB",
                               progress=False)
    assert_same_weights(memory, streamed)
    assert len(set(weight_map.values())) > 3 and any(removed.values())  # several shards; heads removed



def test_both_writers_keep_in_float32_what_the_class_keeps_in_float32():
    """transformers' loading rule, as ``export.parameter_dtypes`` applies it to both writers: the strict list in
    bfloat16 and float16, the other list in float16 only; every other floating parameter in the checkpoint's dtype."""
    model = tiny_model("qwen3_5")
    model._keep_in_fp32_modules_strict, model._keep_in_fp32_modules = {"A_log"}, {"dt_bias"}
    dtype_of = parameter_dtypes(model, torch.bfloat16)
    assert dtype_of("model.layers.0.linear_attn.A_log") == torch.float32
    assert dtype_of("model.layers.0.linear_attn.dt_bias") == torch.bfloat16
    assert parameter_dtypes(model, torch.float16)("model.layers.0.linear_attn.dt_bias") == torch.float32
    assert parameter_dtypes(model, torch.float32)("model.layers.0.linear_attn.A_log") == torch.float32
    streamed = output_tensors(model, torch.bfloat16, {})
    cast_parameters(model, torch.bfloat16)
    in_memory = dict(model.named_parameters())
    a_logs = [name for name in in_memory if name.endswith("A_log")]
    assert a_logs and all(in_memory[name].dtype == streamed[name].dtype == torch.float32 for name in a_logs)
    others = [name for name in in_memory if not name.endswith("A_log")]
    assert all(in_memory[name].dtype == streamed[name].dtype == torch.bfloat16 for name in others if name in streamed)

def fla_plan(name: str) -> dict[int, list[int]]:
    from tiny_fla import plans_for

    return plans_for({"gla": "gla_conv_relu"}.get(name, name))["uneven"]


def test_runs_of_kept_entries():
    assert Slice(0, (0, 1, 2, 5, 7, 8)).runs() == [(0, 3), (5, 6), (7, 9)]


@pytest.mark.parametrize("channels", [[], ["--key-reduction", "0.25", "--key-method", "l1"]], ids=["heads", "channels"])
def test_prune_streams_the_fixture_into_the_folder_the_in_memory_export_writes(tmp_path, channels):
    """bf16 on disk, float32 in memory: the same folder (tensors, shards, config) either way, and the streamed
    one passes the reload check against the in-memory pruned model; with query/key channels removed too."""
    args = ["--method", "norm", "--samples", "2", "--seq-len", "256", "--device", "cpu", "--max-shard-size", "4MB",
            *channels]
    for export in ("memory", "stream"):
        result = invoke("prune", FIXTURE, "--out", tmp_path / export, "--export", export, *args)
        assert result.exit_code == 0, result.output
    assert_same_weights(tmp_path / "memory", tmp_path / "stream")
    assert len(list((tmp_path / "stream").glob("model-*.safetensors"))) > 1
    for name in ("config.json", "generation_config.json"):
        memory, stream = (json.loads((tmp_path / kind / name).read_text()) for kind in ("memory", "stream"))
        assert memory == stream, name
    assert json.loads((tmp_path / "stream" / "compression.json").read_text())["verify"]["passed"]


@pytest.mark.parametrize(("name", "family"), [("kimi_linear", "Kimi Linear"), ("olmo_hybrid", "OLMo-Hybrid")])
def test_families_whose_checkpoints_split_the_convolution_are_refused_before_calibrating(name, family, tmp_path,
                                                                                          monkeypatch):
    import compressor.pipeline

    source = saved_tiny_hybrid(name, tmp_path / "source")
    monkeypatch.setattr(compressor.pipeline, "measure", lambda *a, **k: pytest.fail("calibrated before refusing"))
    result = invoke("prune", source, "--out", tmp_path / "out", "--export", "stream", "--method", "norm",
                    "--device", "cpu")
    assert_user_error(result, family, "--export memory")
    assert not (tmp_path / "out").exists()


def test_a_hub_id_cannot_be_streamed(tmp_path, no_model_load):
    result = invoke("prune", "someone/some-model", "--out", tmp_path / "out", "--export", "stream")
    assert_user_error(result, "local model folder")


MEASURE = RSS + """
import json, sys, time
from pathlib import Path
from compressor.layers import PruningPlan
from compressor.loading import load_structure
from compressor.streaming import write_weights

source, out, kept = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
loaded = load_structure(str(source))
Path("/proc/self/clear_refs").write_text("5")  # the peak RSS (VmHWM) starts again from here
before, start = rss("VmRSS"), time.perf_counter()
write_weights(source, loaded, PruningPlan(kept={int(k): v for k, v in kept.items()}), out, "40MB", progress=False)
print(json.dumps({"before": before, "peak": rss("VmHWM"), "seconds": time.perf_counter() - start}))
"""


@pytest.mark.slow
def test_the_streaming_export_holds_about_one_shard_in_memory(tmp_path):
    """A synthetic 8-layer Qwen3.5 of 0.5 GB in float32, in 40 MB shards: the export's peak RSS grows by at most
    1.5 x its largest output shard and 64 MiB, a quarter of what holding the model would take."""
    source = synthetic_source(tmp_path / "source")
    out = tmp_path / "out"
    out.mkdir()
    kept = {i: list(range(0, 16, 2)) for i in range(8) if (i + 1) % 4}
    measured = subprocess.run([sys.executable, "-c", MEASURE, str(source), str(out), json.dumps(kept)],
                              capture_output=True, text=True, check=True, env=MEASURING_ENV)
    rss = json.loads(measured.stdout.strip().splitlines()[-1])
    largest = max(p.stat().st_size for p in out.glob("model*.safetensors"))
    assert len(list(out.glob("model-*.safetensors"))) > 8
    assert rss["peak"] - rss["before"] <= 1.5 * largest + 2**26, (rss, largest)


@pytest.mark.parametrize("model_type", ["qwen3_5", "qwen3_5_moe"])
def test_a_vision_language_checkpoints_text_model_streams_as_it_is_written_in_memory(model_type, tmp_path):
    """The source names the text model's tensors ``model.language_model.…`` and holds a vision tower; the output
    holds the text model alone, under the names the in-memory export gives it."""
    from test_vision_language_checkpoint import saved_vision_language_model

    saved_vision_language_model(model_type, tmp_path / "vlm")
    for export in ("memory", "stream"):
        result = invoke("prune", tmp_path / "vlm", "--out", tmp_path / export, "--export", export, "--method", "norm",
                        "--samples", "2", "--seq-len", "128", "--device", "cpu")
        assert result.exit_code == 0, result.output
    assert_same_weights(tmp_path / "memory", tmp_path / "stream")
    assert json.loads((tmp_path / "memory" / "config.json").read_text()) == \
        json.loads((tmp_path / "stream" / "config.json").read_text())


@pytest.mark.parametrize("copy_file_range", [True, False])
def test_a_shard_mixes_byte_copied_and_written_tensors(tmp_path, monkeypatch, copy_file_range):
    """``write_shard`` writes a file safetensors reads back: tensors copied byte for byte from another file (with
    ``os.copy_file_range`` or, where it fails, by reading and writing) beside tensors from memory of every kind."""
    from safetensors.torch import save_file

    from compressor.streaming import stored_layout, write_shard

    source = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7, dtype=torch.int64)}
    save_file(source, tmp_path / "source.safetensors")
    layout = stored_layout(tmp_path / "source.safetensors")
    if not copy_file_range:
        def refuse(*args):
            raise OSError("not between these files")
        monkeypatch.setattr("os.copy_file_range", refuse)
    memory = {"scalar": torch.tensor(2.5), "mask": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4),
              "half": torch.randn(2, 2).half()}
    write_shard(tmp_path / "out.safetensors", [("b", layout["b"]), *memory.items(), ("a", layout["a"])],
                {"format": "pt"})
    written = load_file(tmp_path / "out.safetensors")
    assert written.keys() == {*source, *memory}
    for name, tensor in {**source, **memory}.items():
        assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor), name
