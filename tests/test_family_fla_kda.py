"""fla's Kimi Delta Attention (``kda``), grouped value heads included: removing heads equals masking them,
folders reload without compressor, cached generation, ``compress prune`` end to end, """

from __future__ import annotations

import pytest
import torch
from tiny_fla import (
    check_cached_generation,
    check_cli_prune,
    check_reload_without_compressor,
    check_removal_equals_masking,
    tiny_fla_model,
)

NAMES = ["kda_gva", "kda_safe_gate"]


@pytest.mark.parametrize("plan_name", ["uneven", "single-and-odd", "even-uniform"])
@pytest.mark.parametrize("config_name", NAMES)
def test_removing_heads_equals_masking_them(config_name, plan_name):
    check_removal_equals_masking(config_name, plan_name)


def test_uneven_groups_get_an_explicit_head_map():
    from compressor.families import family_for
    from compressor.slicing import PruningPlan, slim

    model = tiny_fla_model("kda_gva")
    slim(model, family_for(model.config), PruningPlan(kept={0: [0, 1, 2, 4], 1: [1, 5], 2: list(range(6))}))
    layer0, layer1 = model.config.per_layer_config[0], model.config.per_layer_config[1]
    assert (layer0.num_heads, layer0.num_v_heads, layer0.value_to_key_head) == (3, 4, [0, 0, 1, 2])
    assert (layer1.num_heads, layer1.num_v_heads, layer1.value_to_key_head) == (2, 2, None)
    mixer = model.model.layers[0].attn
    assert mixer.q_proj.weight.shape[0] == 3 * 8 and mixer.v_proj.weight.shape[0] == 4 * 12
    assert mixer.f_proj[1].weight.shape[0] == mixer.dt_bias.shape[0] == 4 * 8  # per value head and key channel


@pytest.mark.parametrize("config_name", NAMES)
def test_cached_generation_matches_the_masked_model(config_name):
    check_cached_generation(config_name)


def test_saved_folders_reload_without_compressor(tmp_path):
    check_reload_without_compressor(NAMES, tmp_path)


def test_compress_prune_end_to_end(tmp_path):
    check_cli_prune("kda_gva", tmp_path)


def test_padded_positions_leave_the_others_unchanged():
    """Left padding (attention_mask 0) gives the unpadded sequence's logits at the real positions."""
    model = tiny_fla_model("kda_gva")
    ids = torch.randint(3, 96, (1, 40), generator=torch.Generator().manual_seed(5))
    padded = torch.cat([torch.zeros(1, 7, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 7, dtype=torch.long), torch.ones(1, 40, dtype=torch.long)], dim=1)
    with torch.no_grad():
        plain = model(ids).logits
        left = model(padded, attention_mask=mask).logits[:, 7:]
    assert (plain - left).abs().max().item() <= 1e-4
