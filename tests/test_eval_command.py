"""`compress eval`: perplexity and copy recall of a model or a prune output folder, printed and written as JSON."""

import json
import math

import pytest
from conftest import EVAL_TEXT, assert_user_error, invoke

import compressor.quality
from compressor.pipeline import prune
from compressor.settings import CalibrationSettings, EvalSettings, PruneSettings

SHORT = ["--eval", EVAL_TEXT, "--samples", "2", "--seq-len", "128"]


@pytest.fixture(scope="module")
def pruned(fixture_model_path, tmp_path_factory):
    """A prune output folder and the before/after figures prune measured on the same 2 × 128 evaluation tokens."""
    out = tmp_path_factory.mktemp("eval") / "pruned"
    settings = PruneSettings(method="norm", remove="low", heads_per_layer="1:4,3:5",
                             calibration=CalibrationSettings(samples=1, seq_len=128),
                             evaluation=EvalSettings(EVAL_TEXT, 2, 128), verify=False)
    result = prune(str(fixture_model_path), out, settings, progress=False)
    return out, result.record.eval.__dict__


def test_eval_of_the_source_and_the_output_folder_match_what_prune_measured(fixture_model_path, pruned, tmp_path):
    out, measured = pruned
    for model, when in ((fixture_model_path, "before"), (out, "after")):
        json_path = tmp_path / f"{when}.json"
        result = invoke("eval", model, *SHORT, "--json", json_path)
        assert result.exit_code == 0, result.output
        figures = json.loads(json_path.read_text())
        assert figures["perplexity"] == pytest.approx(measured[f"perplexity_{when}"], rel=1e-6)
        assert figures["recall_accuracy"] == measured[f"recall_accuracy_{when}"]
        assert (figures["windows"], figures["seq_len"], figures["tokens"]) == (2, 128, 256)
        assert figures["perplexity"] == pytest.approx(math.exp(figures["loss"]))
        assert f"perplexity: {figures['perplexity']:.2f} on 2 x 128 tokens of {EVAL_TEXT}" in result.output
        assert f"copy-recall accuracy: {figures['recall_accuracy']:.1%} (2 spans of 64" in result.output
    assert measured["perplexity_after"] > measured["perplexity_before"] * 1.01  # heads were removed: figures differ


def test_eval_defaults_to_the_embedded_held_out_text(fixture_model_path):
    embedded = compressor.quality.evaluate(str(fixture_model_path), EvalSettings(samples=1, seq_len=64), progress=False)
    named = compressor.quality.evaluate(str(fixture_model_path), EvalSettings(EVAL_TEXT, 1, 64), progress=False)
    assert embedded["data"].startswith("embedded:python-docs-eval.txt") and embedded["tokens"] == 64
    for key in ("loss", "perplexity", "recall_accuracy", "tokens"):
        assert embedded[key] == named[key], key


@pytest.mark.parametrize("args, message", [
    (["--eval", "missing.txt"], "evaluation file missing.txt does not exist."),
    (["--samples", "0"], "--samples must be at least 1, got 0."),
    (["--seq-len", "1"], "--seq-len must be at least 2, got 1."),
    (["--json", "no/such/folder/figures.json"], "the folder of --json no/such/folder/figures.json does not exist."),
    (["--eval", "blank.txt"], "evaluation file blank.txt is empty."),
    (["--json", "a-folder", "--overwrite"], "--json a-folder is a folder; give the path of a file to write."),
])
def test_eval_refuses_bad_input_before_loading(fixture_model_path, no_model_load, args, message, tmp_path,
                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blank.txt").write_text("\n \n")
    (tmp_path / "a-folder").mkdir()
    result = invoke("eval", fixture_model_path, *args)
    assert result.exit_code == 1 and message in result.output, result.output


def test_eval_refuses_a_missing_model():
    result = invoke("eval", "no/such/model/folder")
    assert result.exit_code == 1 and "does not exist" in result.output


def test_eval_refuses_to_replace_a_file_without_overwrite(fixture_model_path, tmp_path, no_model_load):
    mine = tmp_path / "config.json"
    mine.write_text("{}")
    (tmp_path / "config.json.partial").write_text("mine too")
    result = invoke("eval", fixture_model_path, "--json", mine)
    assert result.exit_code == 1 and "compress eval did not write it" in result.output
    assert mine.read_text() == "{}"
    ours = tmp_path / "figures.json"
    ours.write_text('{"written_by": "compress eval"}')
    result = invoke("eval", fixture_model_path, "--json", ours)
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert ours.read_text() == '{"written_by": "compress eval"}'
    ours.unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "config.json.partial"]


def test_eval_overwrite_replaces_only_its_own_json_file(fixture_model_path, tmp_path):
    """--overwrite replaces an earlier figures file of compress eval, and refuses any other file (a user's JSON,
    even one with the same fields), which stays as it was."""
    figures = tmp_path / "figures.json"
    figures.write_text(json.dumps({"written_by": "compress eval", "windows": 9}))
    (tmp_path / "figures.json.partial").write_text("mine too")
    result = invoke("eval", fixture_model_path, *SHORT, "--json", figures, "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads(figures.read_text())["windows"] == 2
    assert json.loads(figures.read_text())["written_by"] == "compress eval"
    assert (tmp_path / "figures.json.partial").read_text() == "mine too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures.json", "figures.json.partial"]

    mine = tmp_path / "mine.json"
    for text in ('{"windows": 9, "perplexity": 1.0}', "not json", '["compress eval"]'):
        mine.write_text(text)
        assert_user_error(invoke("eval", fixture_model_path, *SHORT, "--json", mine, "--overwrite"),
                          "compress eval did not write it")
        assert mine.read_text() == text


def test_a_file_that_appears_at_json_during_the_evaluation_stays(fixture_model_path, tmp_path, monkeypatch):
    """The --json path is checked again just before the figures are renamed onto it: a file a user wrote there
    while the model was evaluated is kept, the run refused, and no temporary file is left."""
    target = tmp_path / "figures.json"
    measure = compressor.quality.quality

    def meanwhile(*args, **kwargs):
        target.write_text("written meanwhile")
        return measure(*args, **kwargs)

    monkeypatch.setattr(compressor.quality, "quality", meanwhile)
    assert_user_error(invoke("eval", fixture_model_path, *SHORT, "--json", target), "did not write it")
    assert target.read_text() == "written meanwhile"
    assert [p.name for p in tmp_path.iterdir()] == ["figures.json"]


def test_a_json_path_that_is_a_link_is_refused_and_a_tilde_is_expanded(fixture_model_path, tmp_path, monkeypatch,
                                                                        no_model_load):
    """os.replace would put the figures in place of a link, not in its target: links are refused, dangling ones
    too. ``~`` (quoted, or after ``--json=``, where the shell leaves it) is the home folder."""
    (tmp_path / "target.json").write_text('{"written_by": "compress eval"}')
    (tmp_path / "link.json").symlink_to(tmp_path / "target.json")
    (tmp_path / "dangling.json").symlink_to(tmp_path / "nowhere.json")
    for link in ("link.json", "dangling.json"):
        assert_user_error(invoke("eval", fixture_model_path, "--json", tmp_path / link, "--overwrite"),
                          "symbolic link")
        assert (tmp_path / link).is_symlink()
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "mine.json").write_text("mine")
    assert_user_error(invoke("eval", fixture_model_path, "--json", "~/mine.json"), "mine.json",
                      "compress eval did not write it")
