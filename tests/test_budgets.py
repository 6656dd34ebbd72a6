"""Budgets: global, uniform and per-layer head counts, protected layers and the minimum per layer are honoured;
impossible combinations are refused (option combinations before any model loads)."""

import json

import pytest
import torch
from click.testing import CliRunner

from compressor.budgets import Budget, make_budget, parse_heads_per_layer
from compressor.cli import main
from compressor.errors import CompressorError
from compressor.pipeline import prune
from compressor.settings import CalibrationSettings, PruneSettings

# Three layers (0, 2, 5) of 8 heads whose states are 1 byte each; scores rise with the head index, and layer 5's
# heads score highest of all, so a global `remove high` plan would empty layer 5 first.
SCORES = {0: torch.arange(8.0), 2: torch.arange(8.0) + 0.5, 5: torch.arange(8.0) + 100}
HEAD_BYTES = {0: 1, 2: 1, 5: 1}
COUNTS = {layer: 8 for layer in SCORES}


def removed_per_layer(plan):
    return {layer: 8 - len(kept) for layer, kept in plan.kept.items()}


def test_global_budget_leaves_protected_layers_whole_and_reaches_the_reduction():
    plan = make_budget("global", 0.25, protect_layers="5").plan(SCORES, HEAD_BYTES, "high")
    assert removed_per_layer(plan) == {0: 3, 2: 3, 5: 0}  # ceil(0.25 × 24) = 6 heads, highest scores outside 5
    assert plan.kept[0] == plan.kept[2] == [0, 1, 2, 3, 4]
    unprotected = make_budget("global", 0.25).plan(SCORES, HEAD_BYTES, "high")
    assert removed_per_layer(unprotected) == {0: 0, 2: 0, 5: 6}


def test_uniform_budget_removes_the_same_share_of_every_layer_by_score_within_it():
    plan = make_budget("uniform", 0.3).plan(SCORES, HEAD_BYTES, "low")
    assert removed_per_layer(plan) == {0: 3, 2: 3, 5: 3}  # ceil(0.3 × 24) = 8 heads -> 3 of 8 in each layer
    assert all(kept == [3, 4, 5, 6, 7] for kept in plan.kept.values())  # the lowest scores went, in every layer


def test_uniform_budget_with_protection_raises_the_share_of_the_other_layers():
    plan = make_budget("uniform", 0.3, protect_layers=(2,)).plan(SCORES, HEAD_BYTES, "high")
    assert removed_per_layer(plan) == {0: 4, 2: 0, 5: 4}  # 8 heads from 2 layers
    assert 1 - sum(len(k) for k in plan.kept.values()) / 24 >= 0.3


def test_uniform_budget_weighs_layers_by_their_state_bytes():
    # 4 heads of 4 bytes and 8 heads of 1 byte: 24 bytes, 12 to free. A share of 3/8 frees 2·4 + 3·1 = 11 bytes,
    # too few; 1/2 frees 2·4 + 4·1 = 12.
    plan = make_budget("uniform", 0.5).plan({0: torch.arange(4.0), 2: torch.arange(8.0)}, {0: 4, 2: 1}, "high")
    assert {layer: len(kept) for layer, kept in plan.kept.items()} == {0: 2, 2: 4}


def test_per_layer_budget_keeps_exactly_the_given_counts():
    plan = make_budget(heads_per_layer="0:6,5:2").plan(SCORES, HEAD_BYTES, "high")
    assert {layer: len(kept) for layer, kept in plan.kept.items()} == {0: 6, 2: 8, 5: 2}
    assert plan.kept[0] == [0, 1, 2, 3, 4, 5] and plan.kept[5] == [0, 1]


def test_minimum_heads_per_layer_is_honoured_by_every_kind():
    with pytest.raises(CompressorError, match="cannot be met while keeping 6 head"):
        make_budget("global", 0.5, min_heads_per_layer=6).plan(SCORES, HEAD_BYTES, "high")
    plan = make_budget("global", 0.5, min_heads_per_layer=3).plan(SCORES, HEAD_BYTES, "high")
    assert min(len(k) for k in plan.kept.values()) == 3 and len(plan.kept[5]) == 3
    with pytest.raises(CompressorError, match="removes 6 of the 8 heads of layer 0, leaving fewer than "
                                              "--min-heads-per-layer 3"):
        make_budget("uniform", 0.7, min_heads_per_layer=3).plan(SCORES, HEAD_BYTES, "high")


@pytest.mark.parametrize("options, message", [
    (dict(kind="uniform", heads_per_layer="0:4"), "--heads-per-layer sets every layer's head count itself; "
                                                  "drop --budget uniform."),
    (dict(state_reduction=0.3, heads_per_layer="0:4"), "drop --state-reduction."),
    (dict(heads_per_layer="0:4", protect_layers="0,3"), "layer 0 is both protected"),
    (dict(heads_per_layer="0:0"), "keeps 0 head(s) in layer 0, fewer than --min-heads-per-layer 1."),
    (dict(heads_per_layer="0:6,1"), "must map layers to kept heads like 0:6,1:4"),
    (dict(heads_per_layer="zero:6"), "must map layers to kept heads like 0:6,1:4"),
    (dict(heads_per_layer="missing.json"), "file missing.json does not exist."),
    (dict(protect_layers="0;3"), "--protect-layers must list layer indices like 0,3"),
    (dict(kind="even"), "unknown budget 'even'"),
    (dict(state_reduction=1.0), "strictly between 0 and 1"),
    (dict(min_heads_per_layer=0), "--min-heads-per-layer must be at least 1"),
])
def test_impossible_option_combinations_are_refused_in_one_sentence(options, message):
    with pytest.raises(CompressorError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        make_budget(**options)
    assert str(error.value).count(". ") == 0 and str(error.value).endswith(".")


@pytest.mark.parametrize("budget, message", [
    (make_budget(protect_layers="3"), "--protect-layers names layer 3, which is not a linear-attention layer; "
                                      "those are 0, 2, 5."),
    (make_budget(heads_per_layer="2:9"), "keeps 9 heads in layer 2, which has only 8."),
    (make_budget(heads_per_layer="2:8"), "keeps every head of every layer"),
    (make_budget("uniform", 0.5, protect_layers="0,2,5"), "cannot be met without the protected layers 0, 2, 5: "
                                                           "lower --state-reduction or protect fewer layers."),
    (make_budget("uniform", 0.7, min_heads_per_layer=3), "leaving fewer than --min-heads-per-layer 3: lower "
                                                          "--state-reduction or lower --min-heads-per-layer, or use "
                                                          "--budget global."),
    (make_budget("global", 0.5, protect_layers="0,2"), "leaving layers 0, 2 whole; at most 29.2% is possible: "
                                                       "lower --state-reduction or protect fewer layers.$"),
    (make_budget("global", 0.9), "keeping 1 head per layer; at most 87.5% is possible: lower "
                                 "--state-reduction.$"),
    (make_budget("global", 0.5, protect_layers="0,2", min_heads_per_layer=2), "possible: lower --state-reduction, "
                                                                               "protect fewer layers or lower "
                                                                               "--min-heads-per-layer.$"),
])
def test_budgets_this_model_cannot_meet_are_refused(budget, message):
    with pytest.raises(CompressorError, match=message):
        budget.check_model(COUNTS, HEAD_BYTES)


def test_heads_per_layer_reads_a_json_file(tmp_path):
    path = tmp_path / "heads.json"
    path.write_text(json.dumps({"0": 6, "4": 2}))
    assert parse_heads_per_layer(str(path)) == {0: 6, 4: 2} == parse_heads_per_layer("0:6, 4:2")
    path.write_text("[6, 2]")
    with pytest.raises(CompressorError, match="must hold a JSON object"):
        parse_heads_per_layer(str(path))
    path.write_text('{"0": 6, "1": }')
    with pytest.raises(CompressorError, match=r"is not valid JSON \(Expecting value at line 1, column 15\)\.$"):
        parse_heads_per_layer(str(path))


def test_the_budget_is_recorded():
    assert make_budget("uniform", 0.3, protect_layers="2,0").record() == {
        "budget": "uniform", "state_reduction": 0.3, "heads_per_layer": None, "protect_layers": [0, 2],
        "min_heads_per_layer": 1}
    assert Budget().record()["state_reduction"] == 0.389
    assert make_budget(heads_per_layer="4:2,0:6").record()["heads_per_layer"] == {"0": 6, "4": 2}


@pytest.mark.parametrize("args, message", [
    (["--budget", "uniform", "--heads-per-layer", "0:4"], "drop --budget uniform."),
    (["--state-reduction", "0.2", "--heads-per-layer", "0:4"], "drop --state-reduction."),
    (["--protect-layers", "1", "--heads-per-layer", "1:4"], "layer 1 is both protected"),
    (["--loss-seq-len", "1", "--method", "loss"], "--loss-seq-len must be at least 2, got 1."),
])
def test_cli_refuses_impossible_combinations_before_loading(fixture_model_path, tmp_path, no_model_load, args,
                                                            message):
    result = CliRunner().invoke(main, ["prune", str(fixture_model_path), "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 1 and message in result.output, result.output
    assert not any(tmp_path.iterdir())


def test_prune_honours_a_uniform_budget_with_a_protected_layer(fixture_model_path):
    """The fixture: linear-attention layers 0, 1, 3, 4 of 8 heads. 38.9 % of 32 heads is 12.4; from the 3
    unprotected layers that takes 5 of 8 heads each (4 each would free only 12)."""
    settings = PruneSettings(method="norm", remove="low", budget="uniform", protect_layers="0",
                             calibration=CalibrationSettings(samples=1, seq_len=128), dry_run=True)
    result = prune(str(fixture_model_path), None, settings, progress=False)
    assert {layer: len(kept) for layer, kept in result.plan.kept.items()} == {0: 8, 1: 3, 3: 3, 4: 3}
    method = result.record.method
    assert (method.budget, method.protect_layers, method.state_reduction) == ("uniform", [0], 0.389)
    assert 1 - result.record.state_bytes_after / result.record.state_bytes_before >= 0.389


def test_cli_prunes_to_explicit_head_counts(fixture_model_path):
    result = CliRunner().invoke(main, ["prune", str(fixture_model_path), "--heads-per-layer", "1:2,4:5", "--method",
                                       "rank", "--samples", "1", "--seq-len", "128", "--dry-run"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1:4] for line in result.output.splitlines() if "->" in line
            and line.split()[0].isdigit()}
    assert rows == {"0": ["8", "->", "8"], "1": ["8", "->", "2"], "3": ["8", "->", "8"], "4": ["8", "->", "5"]}
