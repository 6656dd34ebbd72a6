"""Removing heads equals masking them, for every family and arbitrary kept subsets; saved folders reload exactly."""

from __future__ import annotations

from textwrap import dedent

import pytest
import torch
from fresh_process import FLA_BLOCKER, STOCK_DISPATCH, reloaded_logits
from tiny_hybrids import check_matches_stock
from tiny_models import CONFIGS, PLANS, check_cached_generation, in_float64, masked_copy, tiny_model

from transformers.integrations.heterogeneity import AmbiguousGlobalPerLayerAttributeError

from compressor.export import write_model
from compressor.families import family_for
from compressor.layers import PruningPlan, linear_layers
from compressor.slicing import slim

TOLERANCE = 2e-4  # float32 rounds differently for different head counts; the float64 tests pin 1e-10


def input_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 96, (2, 150), generator=torch.Generator().manual_seed(seed))  # 2 full chunks + a partial


@pytest.mark.parametrize("plan_name", PLANS)
@pytest.mark.parametrize("config_name", CONFIGS)
def test_removing_heads_equals_masking_them(config_name, plan_name):
    model = tiny_model(config_name)
    kept = PLANS[plan_name]
    ids = input_ids()
    with torch.no_grad():
        unmasked = model(ids).logits
        masked = masked_copy(model, kept)(ids).logits
        slim(model, family_for(model.config), PruningPlan(kept=kept))
        pruned = model(ids).logits
    assert (pruned - masked).abs().max().item() <= TOLERANCE
    assert (pruned - unmasked).abs().max().item() > 1e-2, "the removed heads must matter for this check to mean anything"
    for index, mixer in linear_layers(model, family_for(model.config)).items():
        assert mixer.num_v_heads == len(kept[index])


@pytest.mark.parametrize("config_name", CONFIGS)
def test_unpruned_model_matches_the_stock_class(config_name):
    check_matches_stock(tiny_model(config_name), input_ids(2))
    check_matches_stock(in_float64(tiny_model(config_name)), input_ids(2))  # the shipped norm's float64 form


@pytest.mark.parametrize("plan_name", PLANS)
@pytest.mark.parametrize("config_name", CONFIGS)
def test_removal_is_exact_in_float64(config_name, plan_name):
    """In float64 (the recurrences too) every head's arithmetic is identical: pruning and masking agree to rounding
    of 1e-12, whatever the plan, where float32 batches of one head and of six round differently."""
    model = in_float64(tiny_model(config_name))
    kept = PLANS[plan_name]
    ids = input_ids(1)
    with torch.no_grad():
        masked = masked_copy(model, kept)(ids).logits
        slim(model, family_for(model.config), PruningPlan(kept=kept))
        assert (model(ids).logits - masked).abs().max().item() <= 1e-10


@pytest.mark.parametrize("config_name", ["qwen3_5", "qwen3_next_dense"])
def test_groups_of_three_value_heads_kept_unevenly_keep_their_head_map(config_name):
    """With 3 value heads per key head, keeping 1 and 3 of them (4 heads over 2 key heads: a count that divides
    evenly) still needs the explicit map [0, 1, 1, 1]; the stock grouping of 4 heads would be [0, 0, 1, 1]."""
    model = tiny_model(config_name, linear_num_key_heads=2)
    kept = {0: [0, 3, 4, 5], 2: [0, 1, 2, 3, 4, 5], 3: [1, 2, 3, 4]}  # layer 3: [0, 0, 1, 1], the stock grouping
    ids = input_ids(4)
    with torch.no_grad():
        masked = masked_copy(model, kept)(ids).logits
        slim(model, family_for(model.config), PruningPlan(kept=kept))
        assert (model(ids).logits - masked).abs().max().item() <= TOLERANCE
    assert model.config.per_layer_config[0].linear_value_to_key_head == [0, 1, 1, 1]
    assert getattr(model.config.per_layer_config[3], "linear_value_to_key_head", None) in (None, [0, 0, 1, 1])


def test_config_is_stock_only_for_even_uniform_plans():
    uneven, even = tiny_model("qwen3_next_moe"), tiny_model("qwen3_next_moe")
    slim(uneven, family_for(uneven.config), PruningPlan(kept=PLANS["uneven"]))
    slim(even, family_for(even.config), PruningPlan(kept=PLANS["even-uniform"]))
    assert uneven.config.is_heterogeneous and uneven.config.architectures == ["PrunedQwen3NextForCausalLM"]
    assert uneven.config.per_layer_config[0].linear_value_to_key_head == [0, 0, 1, 2]
    assert uneven.config.per_layer_config[2].linear_num_key_heads == 2
    with pytest.raises(AmbiguousGlobalPerLayerAttributeError):
        uneven.config.linear_num_value_heads  # a loader that ignores per-layer heads fails loudly
    assert not even.config.is_heterogeneous and even.config.architectures == ["Qwen3NextForCausalLM"]
    assert (even.config.linear_num_value_heads, even.config.linear_num_key_heads) == (4, 2)
    assert not hasattr(even.config, "linear_value_to_key_head")


@pytest.mark.parametrize("config_name", CONFIGS)
def test_cached_generation_matches_the_masked_model(config_name):
    """Prefill then token-by-token decode (conv and recurrent caches) gives the masked model's logits."""
    check_cached_generation(tiny_model(config_name), PLANS["single-and-odd"], input_ids(2)[:, :70])


@pytest.mark.slow
def test_saved_folders_reload_without_compressor(tmp_path):
    """Each family's folder loads in a fresh process where neither compressor nor fla can be imported, with the same
    logits, and generates with its cache; an even uniform plan also loads into the stock class, weights complete."""
    ids = input_ids(3)
    expected = {}
    for config_name in CONFIGS:
        for plan_name in ("uneven", "even-uniform"):
            model = tiny_model(config_name)
            family = family_for(model.config)
            slim(model, family, PruningPlan(kept=PLANS[plan_name]))
            folder = tmp_path / f"{config_name}-{plan_name}"
            write_model(model, family, folder, max_shard_size="200KB")
            with torch.no_grad():
                expected[folder.name] = model(ids).logits
    assert any(p.name == "model.safetensors.index.json" for p in tmp_path.rglob("*")), "sharding was exercised"
    reloaded = reloaded_logits(sorted(expected), ids, tmp_path, checks=dedent("""
        if name.endswith("even-uniform"):
            stock_class = AutoModelForCausalLM._model_mapping[type(model.config)]
            stock, info = stock_class.from_pretrained(name, output_loading_info=True)
            assert type(stock).__module__.startswith("transformers."), type(stock)
            assert not any(info.values()), info
        """) + STOCK_DISPATCH, prelude=FLA_BLOCKER)
    for name, logits in expected.items():
        assert (reloaded[name] - logits).abs().max().item() <= TOLERANCE, name


def test_after_import_compressor_folders_load_without_trust_remote_code(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("qwen3_5")
    family = family_for(model.config)
    slim(model, family, PruningPlan(kept=PLANS["uneven"]))
    write_model(model, family, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(reloaded) is family.model_class
    ids = input_ids(4)
    with torch.no_grad():
        assert (reloaded(ids).logits - model(ids).logits).abs().max().item() <= TOLERANCE
