"""Qwen3.5-MoE (``qwen3_5_moe_text``): pruning equals masking, reloads without compressor, generates, and
``compress prune`` works end to end."""

from __future__ import annotations

import pytest
import torch
from tiny_hybrids import (
    check_cached_generation,
    check_calibration_states,
    check_exact_in_float64,
    check_fresh_reload,
    check_matches_stock,
    check_prune_end_to_end,
    check_removal_equals_masking,
    tiny_hybrid,
)
from tiny_models import PLANS

from compressor.families import family_for
from compressor.slicing import PruningPlan, slim

NAME = "qwen3_5_moe"


def test_unpruned_model_matches_the_stock_class():
    check_matches_stock(tiny_hybrid(NAME))


@pytest.mark.parametrize("plan_name", PLANS)
def test_removing_heads_equals_masking_them(plan_name):
    check_removal_equals_masking(tiny_hybrid(NAME), PLANS[plan_name])


def test_removal_is_exact_in_float64():
    check_exact_in_float64(tiny_hybrid(NAME), PLANS["uneven"])


def test_config_records_uneven_groups():
    model = tiny_hybrid(NAME)
    slim(model, family_for(model.config), PruningPlan(kept=PLANS["uneven"]))
    assert model.config.architectures == ["PrunedQwen3_5MoeForCausalLM"]
    assert model.config.per_layer_config[0].linear_value_to_key_head == [0, 0, 1, 2]
    assert model.config.per_layer_config[2].linear_num_value_heads == 2


def test_calibration_receives_every_head_state():
    check_calibration_states(tiny_hybrid(NAME))


def test_cached_generation_matches_the_masked_model():
    check_cached_generation(tiny_hybrid(NAME), PLANS["single-and-odd"])


def test_saved_folders_reload_without_compressor(tmp_path):
    models = {}
    for plan_name in ("uneven", "even-uniform"):
        model = tiny_hybrid(NAME)
        slim(model, family_for(model.config), PruningPlan(kept=PLANS[plan_name]))
        models[plan_name] = model
    check_fresh_reload(models, tmp_path)


def test_compress_prune_end_to_end(tmp_path):
    record = check_prune_end_to_end(NAME, tmp_path)
    assert record["family"] == "qwen3_5_moe_text"
    assert torch.tensor([len(entry["kept_heads"]) for entry in record["layers"].values()]).sum() < 18
