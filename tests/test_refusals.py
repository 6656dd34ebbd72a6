"""Families whose heads cannot be removed exactly with their stock layers are refused, with the reason, before any
weight is loaded or anything written."""

from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner
from fla.models import HGRN2Config, RetNetConfig, RWKV7Config
from transformers import LlavaConfig, Mamba2Config

from compressor.cli import main
from conftest import FIXTURE

SMALL = dict(hidden_size=64, num_hidden_layers=2, vocab_size=96)
REFUSALS = {
    "retnet": (lambda: RetNetConfig(num_heads=4, **SMALL), "fixes each head's decay by its index"),
    "mamba2": (lambda: Mamba2Config(num_heads=8, head_dim=16, n_groups=2, **SMALL), "fewer groups than heads"),
    "hgrn2": (lambda: HGRN2Config(num_heads=4, expand_ratio=None, **SMALL), "splits the whole hidden size"),
    "rwkv7": (lambda: RWKV7Config(head_dim=16, **SMALL), "cannot hold fewer heads"),
}


@pytest.mark.parametrize("model_type", REFUSALS)
def test_unprunable_families_are_refused_with_the_reason(model_type, tmp_path):
    make_config, reason = REFUSALS[model_type]
    source, out = tmp_path / "source", tmp_path / "out"
    config = make_config()
    assert config.model_type == model_type
    config.save_pretrained(source)  # a config alone: the refusal must come before the weights are read
    result = CliRunner().invoke(main, ["prune", str(source), "--out", str(out)])
    assert result.exit_code == 1, result.output
    message = result.output.strip().splitlines()[-1]
    assert f"cannot prune model type '{model_type}'" in message and reason in message, message
    supported = message.split("(supported: ")[1].rstrip(").").split(", ")
    assert {"qwen3_5_text", "qwen3_next", "kimi_linear", "olmo_hybrid", "gated_deltanet"} <= set(supported), message
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def test_a_vision_language_model_with_an_unsupported_text_model_is_refused_by_its_own_type(tmp_path):
    LlavaConfig().save_pretrained(tmp_path / "source")
    result = CliRunner().invoke(main, ["prune", str(tmp_path / "source"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert "cannot prune model type 'llava'; supported model types: " in result.output
    assert "qwen3_5_text" in result.output
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_before_the_weights_load(tmp_path):
    """The fixture's 8,192-token tokenizer beside a model of 96 embeddings: one sentence, nothing written (the
    weights are not even read: the folder holds a config and a tokenizer only)."""
    import shutil

    from tiny_models import qwen3_5_config

    source, out = tmp_path / "source", tmp_path / "out"
    qwen3_5_config().save_pretrained(source)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(FIXTURE / name, source / name)
    result = CliRunner().invoke(main, ["prune", str(source), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "has 8,192 tokens but the model's vocabulary only 96" in result.output.strip().splitlines()[-1]
    assert not out.exists()


def test_a_folder_without_a_tokenizer_is_refused_in_one_sentence(tmp_path):
    """Without tokenizer files transformers builds an empty tokenizer, and calibration would find 0 tokens."""
    import shutil

    source, out = tmp_path / "source", tmp_path / "out"
    source.mkdir()
    for file in FIXTURE.glob("*"):
        if not file.name.startswith("tokenizer"):
            shutil.copy(file, source / file.name)
    result = CliRunner().invoke(main, ["prune", str(source), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "has no usable tokenizer" in result.output.strip().splitlines()[-1]
    assert not out.exists()


@pytest.mark.parametrize("mistake", ["bad value", "no such model", "foreign output folder"])
def test_mistakes_are_refused_before_the_pipeline_is_imported(monkeypatch, tmp_path, mistake):
    """Options, the model's location and the output folder are checked before the pipeline's imports (fla and every
    family's modeling code): a mistake is refused in a second or two, not after ten."""
    from conftest import assert_user_error, invoke

    monkeypatch.setitem(sys.modules, "compressor.pipeline", None)  # importing it now raises ImportError
    out = tmp_path / "out"
    args, words = {
        "bad value": ([FIXTURE, "--out", out, "--state-reduction", "1.5"], ["--state-reduction", "1.5"]),
        "no such model": ([tmp_path / "missing", "--out", out], ["does not exist"]),
        "foreign output folder": ([FIXTURE, "--out", tmp_path], ["did not write"]),
    }[mistake]
    (tmp_path / "keep.txt").write_text("mine")
    assert_user_error(invoke("prune", *args), *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_eval_output_mistakes_are_refused_before_the_evaluation_is_imported(monkeypatch, tmp_path):
    """An existing --json file or a missing folder for it is refused before ``compress eval`` imports torch."""
    from conftest import assert_user_error, invoke

    monkeypatch.setitem(sys.modules, "compressor.quality", None)  # importing it now raises ImportError
    mine = tmp_path / "figures.json"
    mine.write_text("mine")
    assert_user_error(invoke("eval", FIXTURE, "--json", mine), "already exists", "did not write it")
    assert_user_error(invoke("eval", FIXTURE, "--json", tmp_path / "no" / "f.json"), "does not exist")
    assert mine.read_text() == "mine"


HEAVY = ("compressor.pipeline", "compressor.quality", "compressor.loading", "compressor.calibration")
"""The modules that pull in torch, transformers and fla."""


@pytest.mark.parametrize("command, words", [
    (["eval", "{missing}"], ["model folder", "does not exist"]),
    (["analyze", "{missing}"], ["model folder", "does not exist"]),
    (["analyze", "{missing}", "--every", "63"], ["--every"]),  # the options first, as the pipeline checks them
    (["heal", "{missing}", "--teacher", FIXTURE, "--out", "{out}"], ["pruned folder", "does not exist"]),
    (["heal", "{missing}", "--teacher", FIXTURE, "--out", "{out}", "--tokens", "0"], ["--tokens"]),
    (["heal", FIXTURE, "--teacher", FIXTURE, "--out", "{out}"], ["was not written by compressor"]),
    (["heal", "{pruned}", "--teacher", "{missing}", "--out", "{out}"], ["teacher folder", "does not exist"]),
    (["prune", FIXTURE, "--out", "{out}", "--calib", "{missing}"], ["calibration file", "does not exist"]),
    (["prune", FIXTURE, "--dry-run", "--calib", "{pruned}"], ["calibration folder", "holds no text files"]),
    (["analyze", FIXTURE, "--calib", "{missing}"], ["calibration file", "does not exist"]),
])
def test_missing_models_are_refused_before_the_heavy_imports(monkeypatch, tmp_path, command, words):
    """eval, analyze, prune and heal check their options, then say that a model folder or the calibration text is
    missing (or a folder not a prune output) before they import the modules that pull in torch, transformers and
    fla."""
    from conftest import assert_user_error, invoke

    pruned = tmp_path / "pruned"
    pruned.mkdir()
    for name in ("config.json", "compression.json"):
        (pruned / name).write_text("{}")
    for module in HEAVY:
        monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError
    values = dict(missing=tmp_path / "missing", out=tmp_path / "out", pruned=pruned)
    args = [str(part).format(**values) for part in command]
    assert_user_error(invoke(*args), *words)
    assert not (tmp_path / "out").exists()


def test_a_budget_the_model_cannot_meet_is_refused_before_the_weights_load(tmp_path):
    """A folder holding a config alone: the refusal must name the budget, not the missing weights."""
    from tiny_models import qwen3_5_config

    source, out = tmp_path / "source", tmp_path / "out"
    config = qwen3_5_config()
    config.save_pretrained(source)
    heads = config.linear_num_value_heads
    result = CliRunner().invoke(main, ["prune", str(source), "--out", str(out), "--state-reduction", "0.9",
                                       "--min-heads-per-layer", str(heads - 1)])
    assert result.exit_code != 0, result.output
    message = result.output.strip().splitlines()[-1]
    assert "lower --state-reduction" in message and "--min-heads-per-layer" in message, message
    assert not out.exists()


def test_a_file_given_as_the_model_is_named_as_a_file(tmp_path):
    result = CliRunner().invoke(main, ["prune", str(FIXTURE / "config.json"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert "config.json is a file; give the model's folder (the one holding config.json)." in result.output
    assert not (tmp_path / "out").exists()


def test_an_unreadable_local_config_is_named_as_such(monkeypatch):
    """A local folder whose config.json cannot be read is not blamed on the network or the Hub."""
    from transformers import AutoConfig

    from compressor.errors import CompressorError
    from compressor.loading import load_model

    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(AutoConfig, "from_pretrained", unreadable)
    with pytest.raises(CompressorError, match=r"^could not load the config of '.*' \(its config.json cannot be "
                                              r"read\): \[Errno 13\] Permission denied"):
        load_model(str(FIXTURE))
