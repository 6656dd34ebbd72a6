"""``--device-map``: decoder layers spread over several GPUs by accelerate, for calibration and evaluation. No GPU
here: the maps are computed for two GPUs by construction, and ``prune --device-map auto`` runs through
``from_pretrained(device_map=…)`` on the CPU's map."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import init_empty_weights
from conftest import EVAL_TEXT, FIXTURE, invoke
from safetensors.torch import load_file

from compressor.loading import load_model
from compressor.placement import device_map, max_memory


def skeleton():
    loaded = load_model(str(FIXTURE), "cpu")
    with init_empty_weights():
        return loaded.family.model_class(loaded.model.config)


@pytest.fixture
def two_gpus(monkeypatch):
    """accelerate sees two CUDA devices (it only counts them to check ``max_memory``'s keys)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize("strategy", ["auto", "sequential"])
def test_a_map_over_two_gpus_keeps_every_decoder_layer_whole(strategy, two_gpus):
    """The fixture (6 decoder layers of 2.5 MB in float32, 31 MB in all) over two GPUs of 24 MB each."""
    placed = device_map(skeleton(), strategy, max_memory("24MB", None, gpus=2), torch.float32)
    layers = {name: device for name, device in placed.items() if name.startswith("model.layers")}
    assert sorted(layers, key=lambda n: int(n.split(".")[2])) == [f"model.layers.{i}" for i in range(6)]
    assert set(placed.values()) == {0, 1}
    devices = [layers[f"model.layers.{i}"] for i in range(6)]
    assert devices == sorted(devices)  # in order: activations go from GPU 0 to GPU 1 once
    if strategy == "auto":  # balanced: both GPUs hold decoder layers
        assert set(devices) == {0, 1}


def test_a_map_that_offloads_is_refused(two_gpus):
    from compressor.errors import CompressorError

    with pytest.raises(CompressorError, match="--max-gpu-memory"):
        device_map(skeleton(), "sequential", max_memory("8MB", "1GB", gpus=2), torch.float32)


def test_prune_with_a_device_map_writes_the_same_folder(tmp_path):
    common = ["--method", "norm", "--samples", "2", "--seq-len", "256", "--device", "cpu",
              "--eval", EVAL_TEXT, "--eval-samples", "2", "--eval-seq-len", "128"]
    plain = invoke("prune", FIXTURE, "--out", tmp_path / "plain", *common)
    mapped = invoke("prune", FIXTURE, "--out", tmp_path / "mapped", "--device-map", "auto", *common)
    assert plain.exit_code == 0 and mapped.exit_code == 0, (plain.output, mapped.output)
    records = [json.loads((tmp_path / kind / "compression.json").read_text()) for kind in ("plain", "mapped")]
    assert records[0]["layers"] == records[1]["layers"] and records[0]["eval"] == records[1]["eval"]
    assert records[1]["verify"]["passed"]
    weights = [load_file(tmp_path / kind / "model.safetensors") for kind in ("plain", "mapped")]
    assert all(torch.equal(t, weights[1][n]) for n, t in weights[0].items())


def test_analyze_and_eval_with_a_device_map_measure_the_same(tmp_path, monkeypatch):
    """``analyze`` and ``eval`` take ``--device-map`` too (calibration and evaluation alike): they load through a
    device map, and on the CPU's map measure the same statistics, perplexity and recall as without it."""
    import compressor.placement

    maps = []
    original = compressor.placement.device_map
    monkeypatch.setattr(compressor.placement, "device_map", lambda *args: maps.append(args[1]) or original(*args))
    common = ["--samples", "2", "--seq-len", "256", "--device", "cpu"]
    for kind in ("plain", "mapped"):
        extra = ["--device-map", "auto"] if kind == "mapped" else []
        result = invoke("analyze", FIXTURE, "--out", tmp_path / f"stats-{kind}", *common, *extra)
        assert result.exit_code == 0, result.output
        result = invoke("eval", FIXTURE, "--eval", EVAL_TEXT, "--samples", "2", "--seq-len", "128", "--device", "cpu",
                        "--json", tmp_path / f"eval-{kind}.json", *extra)
        assert result.exit_code == 0, result.output
    assert maps == ["auto", "auto"]  # the mapped analyze and eval, not the plain ones
    stats = [load_file(tmp_path / f"stats-{kind}" / "stats.safetensors") for kind in ("plain", "mapped")]
    assert stats[0].keys() == stats[1].keys()
    assert all(torch.equal(stats[0][name], stats[1][name]) for name in stats[0])
    figures = [json.loads((tmp_path / f"eval-{kind}.json").read_text()) for kind in ("plain", "mapped")]
    assert (figures[0]["perplexity"], figures[0]["recall_accuracy"]) == (figures[1]["perplexity"],
                                                                          figures[1]["recall_accuracy"])
