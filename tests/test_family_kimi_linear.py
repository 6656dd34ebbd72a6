"""Kimi Linear (``kimi_linear``, KDA + MLA + MoE): pruning KDA heads equals masking them, the MLA layer is left
alone, folders reload without compressor, generation works with the cache, and ``compress prune`` works end to
end."""

from __future__ import annotations

import json

import pytest
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
from compressor.slicing import PruningPlan, linear_layers, slim

NAME = "kimi_linear"


def test_only_kda_layers_are_prunable():
    model = tiny_hybrid(NAME)
    mixers = linear_layers(model, family_for(model.config))
    assert sorted(mixers) == [0, 2, 3]  # layer 1 is MLA, also at self_attn
    assert all(type(m).__name__ == "PrunedKimiDeltaAttention" for m in mixers.values())


def test_unpruned_model_matches_the_stock_class():
    check_matches_stock(tiny_hybrid(NAME))


@pytest.mark.parametrize("plan_name", PLANS)
def test_removing_heads_equals_masking_them(plan_name):
    check_removal_equals_masking(tiny_hybrid(NAME), PLANS[plan_name])


def test_removal_is_exact_in_float64():
    check_exact_in_float64(tiny_hybrid(NAME), PLANS["uneven"])


def test_per_channel_tensors_are_sliced_per_head():
    model = tiny_hybrid(NAME)
    before = linear_layers(model, family_for(model.config))[2]
    dt_bias, a_log = before.forget_gate.dt_bias.detach().clone(), before.forget_gate.A_log.detach().clone()
    slim(model, family_for(model.config), PruningPlan(kept=PLANS["uneven"]))  # layer 2 keeps heads 1 and 5
    after = linear_layers(model, family_for(model.config))[2]
    assert after.forget_gate.dt_bias.tolist() == dt_bias.view(6, 8)[[1, 5]].flatten().tolist()
    assert after.forget_gate.A_log.shape == (1, 1, 2, 1)
    assert after.forget_gate.A_log.flatten().tolist() == a_log.flatten()[[1, 5]].tolist()
    assert after.forget_gate.f_b_proj.weight.shape == (16, 8) and after.g_b_proj.weight.shape == (16, 8)
    assert model.config.architectures == ["PrunedKimiLinearForCausalLM"]
    assert model.config.per_layer_config[2].linear_num_heads == 2
    assert model.config.per_layer_config[1].linear_num_heads == 6  # the MLA layer's view is untouched


def test_uniform_plans_write_a_stock_config(tmp_path):
    model = tiny_hybrid(NAME)
    slim(model, family_for(model.config), PruningPlan(kept=PLANS["even-uniform"]))
    assert not model.config.is_heterogeneous and model.config.linear_num_heads == 4
    assert model.config.architectures == ["KimiLinearForCausalLM"]
    model.config.save_pretrained(tmp_path)
    assert "linear_value_to_key_head" not in json.loads((tmp_path / "config.json").read_text())


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
    assert (tmp_path / "uneven" / "kda.py").is_file()


def test_compress_prune_end_to_end(tmp_path):
    record = check_prune_end_to_end(NAME, tmp_path)
    assert record["family"] == "kimi_linear"
    assert sorted(record["layers"]) == ["0", "2", "3"]
