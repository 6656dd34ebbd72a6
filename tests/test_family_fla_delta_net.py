"""fla's DeltaNet (``delta_net``): removing heads equals masking them, the config's expand_k/expand_v follow the
head counts, folders reload without compressor, cached generation, and ``compress prune`` end to end."""

from __future__ import annotations

import pytest
from tiny_fla import (
    check_cached_generation,
    check_cli_prune,
    check_reload_without_compressor,
    check_removal_equals_masking,
    tiny_fla_model,
)

NAMES = ["delta_net", "delta_net_relu_sum"]


@pytest.mark.parametrize("plan_name", ["uneven", "single-and-odd", "even-uniform"])
@pytest.mark.parametrize("config_name", NAMES)
def test_removing_heads_equals_masking_them(config_name, plan_name):
    check_removal_equals_masking(config_name, plan_name)


def test_head_counts_go_through_expand_k_and_expand_v():
    from compressor.families import family_for
    from compressor.slicing import PruningPlan, slim

    model = tiny_fla_model("delta_net")
    slim(model, family_for(model.config), PruningPlan(kept={0: [0, 2, 3], 1: [1], 2: [0, 1, 2, 3]}))
    layer0, layer1 = model.config.per_layer_config[0], model.config.per_layer_config[1]
    assert (layer0.num_heads, layer0.expand_k, layer0.expand_v) == (3, 3 * 8 / 64, 3 * 16 / 64)
    assert (layer1.num_heads, layer1.expand_k, layer1.expand_v) == (1, 8 / 64, 16 / 64)
    mixer = model.model.layers[0].attn
    assert (mixer.head_k_dim, mixer.head_v_dim, mixer.key_dim, mixer.value_dim) == (8, 16, 24, 48)


@pytest.mark.parametrize("config_name", NAMES)
def test_cached_generation_matches_the_masked_model(config_name):
    check_cached_generation(config_name)


def test_saved_folders_reload_without_compressor(tmp_path):
    check_reload_without_compressor(NAMES, tmp_path)


def test_compress_prune_end_to_end(tmp_path):
    check_cli_prune("delta_net", tmp_path)
