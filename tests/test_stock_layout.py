"""``--layout stock``: the same heads in every layer, in the stock grouping, written as a stock config that stock
transformers loads without compressor, without fla and without remote code, exactly as the masked source."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURE, assert_user_error, invoke
from fresh_process import FLA_BLOCKER, run_without_compressor
from tiny_models import masked_copy, tiny_model

from compressor.budgets import make_budget, stock_plan, stock_shape
from compressor.errors import CompressorError
from compressor.export import write_model
from compressor.families import family_for
from compressor.layers import linear_layers
from compressor.slicing import slim

NO_FLA = FLA_BLOCKER + """
import torch
from transformers import AutoModelForCausalLM

ids = torch.load("ids.pt")
out = {}
for name in NAMES:
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval()
    assert type(model).__module__.startswith("transformers.models."), type(model)
    with torch.no_grad():
        out[name] = model(ids).logits
torch.save(out, "logits.pt")
"""


@pytest.mark.parametrize(("keys", "per_key", "reduction", "shape"), [
    (3, 2, 0.389, (3, 1)), (3, 2, 0.2, (2, 2)), (4, 2, 0.389, (4, 1)), (16, 2, 0.389, (9, 2)), (8, 1, 0.5, (4, 1)),
])
def test_the_stock_shape_keeps_the_most_state_that_meets_the_budget(keys, per_key, reduction, shape):
    groups = {layer: tuple(j // per_key for j in range(keys * per_key)) for layer in (0, 2)}
    assert stock_shape(groups, reduction) == shape
    k, q = shape
    assert 1 - k * q / (keys * per_key) >= reduction


def test_the_stock_shape_refuses_what_it_cannot_meet():
    groups = {0: (0, 0, 1, 1), 1: (0, 0, 1, 1)}
    with pytest.raises(CompressorError, match="removes at most 50.0%"):
        stock_shape(groups, 0.6, min_heads=2)
    with pytest.raises(CompressorError, match="layers differ"):
        stock_shape({0: (0, 0, 1, 1), 1: (0, 1)}, 0.3)


def test_the_stock_plan_keeps_the_best_heads_of_the_best_key_heads():
    groups = {0: (0, 0, 1, 1, 2, 2)}
    scores = {0: torch.tensor([0.9, 0.1, 0.5, 0.6, 0.2, 0.3])}
    assert stock_plan(scores, groups, (2, 1), "low").kept == {0: [0, 3]}  # best of each group: 0.9, 0.6, 0.3
    assert stock_plan(scores, groups, (1, 2), "low").kept == {0: [2, 3]}  # group sums 1.0, 1.1, 0.5
    assert stock_plan(scores, groups, (2, 1), "high").kept == {0: [1, 4]}  # the lowest: 0.1, 0.5, 0.2


@pytest.mark.parametrize("config_name", ["qwen3_5", "qwen3_next_moe"])
def test_stock_folders_load_with_stock_transformers_as_the_masked_source(config_name, tmp_path):
    ids = torch.randint(3, 96, (2, 40), generator=torch.Generator().manual_seed(1))
    expected, names = {}, []
    for reduction in (0.389, 0.2):  # one value head under each key head; whole key groups
        model = tiny_model(config_name)
        family = family_for(model.config)
        mixers = linear_layers(model, family)
        budget = make_budget(state_reduction=reduction, layout="stock").fitted(
            {i: tuple(m.value_to_key) for i, m in mixers.items()})
        scores = {i: torch.rand(m.num_v_heads, generator=torch.Generator().manual_seed(i)) for i, m in mixers.items()}
        plan = budget.plan(scores, {i: 1 for i in mixers}, "low")
        with torch.no_grad():
            masked = masked_copy(model, plan.kept)(ids).logits
        slim(model, family, plan)
        folder = tmp_path / f"{config_name}-{reduction}"
        assert write_model(model, family, folder, stock=True) == []
        config = json.loads((folder / "config.json").read_text())
        assert "per_layer_config" not in config and "auto_map" not in config
        assert not list(folder.glob("*.py"))
        expected[folder.name], names = masked, [*names, folder.name]
    torch.save(ids, tmp_path / "ids.pt")
    run_without_compressor(f"NAMES = {names!r}\n" + NO_FLA, tmp_path)
    reloaded = torch.load(tmp_path / "logits.pt")
    for name, logits in expected.items():
        assert (reloaded[name] - logits).abs().max().item() <= 1e-4, name


def test_prune_with_the_stock_layout_writes_a_stock_folder_and_records_it(tmp_path):
    out = tmp_path / "stock"
    result = invoke("prune", FIXTURE, "--out", out, "--layout", "stock", "--method", "norm", "--samples", "2",
                    "--seq-len", "128")
    assert result.exit_code == 0, result.output
    assert "layout: stock" in result.stdout and "may remove more than asked" in result.stdout
    assert "(50.0% smaller; asked: 38.9%)" in result.stdout  # 4 of 8 heads in every layer: the coarser step
    record = json.loads((out / "compression.json").read_text())
    assert record["layout"] == "stock" and record["per_layer_heads"] is False
    assert {len(layer["kept_heads"]) for layer in record["layers"].values()} == {4}
    assert "| `layout` | stock" in (out / "README.md").read_text()


def test_a_budget_the_stock_layout_cannot_meet_is_refused_before_calibration(tmp_path, monkeypatch):
    import compressor.pipeline

    monkeypatch.setattr(compressor.pipeline, "collect_state_statistics",
                        lambda *a, **k: pytest.fail("calibration ran"))
    result = invoke("prune", FIXTURE, "--out", tmp_path / "out", "--layout", "stock", "--method", "norm",
                    "--state-reduction", "0.9", "--min-heads-per-layer", "2")
    assert_user_error(result, "--layout stock", "at most 75.0%")
    refused = invoke("prune", FIXTURE, "--dry-run", "--layout", "stock", "--protect-layers", "0")
    assert_user_error(refused, "--protect-layers")
    assert_user_error(invoke("prune", FIXTURE, "--dry-run", "--layout", "stock", "--budget", "uniform"),
                      "drop --budget uniform")
