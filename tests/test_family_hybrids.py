"""The transformers hybrids — Qwen3.5-MoE (``qwen3_5_moe_text``), OLMo-Hybrid (``olmo_hybrid``) and Kimi Linear
(``kimi_linear``, KDA + MLA + MoE): pruning equals masking, folders reload without compressor, generation works
with the cache, and ``compress prune`` works end to end."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_hybrids import (
    check_calibration_states,
    check_exact_in_float64,
    check_fresh_reload,
    check_matches_stock,
    check_prune_end_to_end,
    check_removal_equals_masking,
    input_ids,
    tiny_hybrid,
)
from tiny_models import PLANS, check_cached_generation, in_float64

from compressor.families import family_for
from compressor.layers import PruningPlan, linear_layers
from compressor.slicing import slim

MODEL_TYPES = {"qwen3_5_moe": "qwen3_5_moe_text", "olmo_hybrid": "olmo_hybrid", "kimi_linear": "kimi_linear"}
PRUNED_CLASSES = {
    "qwen3_5_moe": "PrunedQwen3_5MoeForCausalLM",
    "olmo_hybrid": "PrunedOlmoHybridForCausalLM",
    "kimi_linear": "PrunedKimiLinearForCausalLM",
}


@pytest.mark.parametrize("name", MODEL_TYPES)
def test_unpruned_model_matches_the_stock_class(name):
    check_matches_stock(tiny_hybrid(name))
    check_matches_stock(in_float64(tiny_hybrid(name)))


@pytest.mark.parametrize("plan_name", PLANS)
@pytest.mark.parametrize("name", MODEL_TYPES)
def test_removing_heads_equals_masking_them(name, plan_name):
    check_removal_equals_masking(tiny_hybrid(name), PLANS[plan_name])


@pytest.mark.parametrize("plan_name", PLANS)
@pytest.mark.parametrize("name", MODEL_TYPES)
def test_removal_is_exact_in_float64(name, plan_name):
    check_exact_in_float64(tiny_hybrid(name), PLANS[plan_name])


@pytest.mark.parametrize("name", MODEL_TYPES)
def test_calibration_receives_every_head_state(name):
    check_calibration_states(tiny_hybrid(name))


@pytest.mark.parametrize("name", MODEL_TYPES)
def test_cached_generation_matches_the_masked_model(name):
    check_cached_generation(tiny_hybrid(name), PLANS["single-and-odd"], input_ids(2)[:, :70])


@pytest.mark.slow
def test_saved_folders_reload_without_compressor(tmp_path):
    """One fresh process loads an uneven and an even-uniform folder of every hybrid."""
    models = {}
    for name in MODEL_TYPES:
        for plan_name in ("uneven", "even-uniform"):
            model = tiny_hybrid(name)
            slim(model, family_for(model.config), PruningPlan(kept=PLANS[plan_name]))
            models[f"{name}-{plan_name}"] = model
    check_fresh_reload(models, tmp_path)
    assert (tmp_path / "kimi_linear-uneven" / "kda.py").is_file()


@pytest.mark.parametrize("name", MODEL_TYPES)
def test_compress_prune_end_to_end(name, tmp_path):
    record = check_prune_end_to_end(name, tmp_path)
    assert record["family"] == MODEL_TYPES[name]
    if name == "kimi_linear":
        assert sorted(record["layers"]) == ["0", "2", "3"]
    else:
        assert torch.tensor([len(entry["kept_heads"]) for entry in record["layers"].values()]).sum() < 18


@pytest.mark.parametrize("name", ["qwen3_5_moe", "olmo_hybrid"])
def test_config_records_uneven_groups(name):
    model = tiny_hybrid(name)
    slim(model, family_for(model.config), PruningPlan(kept=PLANS["uneven"]))
    assert model.config.architectures == [PRUNED_CLASSES[name]]
    assert model.config.per_layer_config[0].linear_value_to_key_head == [0, 0, 1, 2]
    assert model.config.per_layer_config[2].linear_num_value_heads == 2


def test_kimi_only_kda_layers_are_prunable():
    model = tiny_hybrid("kimi_linear")
    mixers = linear_layers(model, family_for(model.config))
    assert sorted(mixers) == [0, 2, 3]  # layer 1 is MLA, also at self_attn
    assert all(type(m).__name__ == "PrunedKimiDeltaAttention" for m in mixers.values())


def test_kimi_per_channel_tensors_are_sliced_per_head():
    model = tiny_hybrid("kimi_linear")
    before = linear_layers(model, family_for(model.config))[2]
    dt_bias, a_log = before.forget_gate.dt_bias.detach().clone(), before.forget_gate.A_log.detach().clone()
    slim(model, family_for(model.config), PruningPlan(kept=PLANS["uneven"]))  # layer 2 keeps heads 1 and 5
    after = linear_layers(model, family_for(model.config))[2]
    assert after.forget_gate.dt_bias.tolist() == dt_bias.view(6, 8)[[1, 5]].flatten().tolist()
    assert after.forget_gate.A_log.shape == (1, 1, 2, 1)
    assert after.forget_gate.A_log.flatten().tolist() == a_log.flatten()[[1, 5]].tolist()
    assert after.forget_gate.f_b_proj.weight.shape == (16, 8) and after.g_b_proj.weight.shape == (16, 8)
    assert model.config.architectures == [PRUNED_CLASSES["kimi_linear"]]
    assert model.config.per_layer_config[2].linear_num_heads == 2
    assert model.config.per_layer_config[1].linear_num_heads == 6  # the MLA layer's view is untouched


def test_kimi_uniform_plans_write_a_stock_config(tmp_path):
    model = tiny_hybrid("kimi_linear")
    slim(model, family_for(model.config), PruningPlan(kept=PLANS["even-uniform"]))
    assert not model.config.is_heterogeneous and model.config.linear_num_heads == 4
    assert model.config.architectures == ["KimiLinearForCausalLM"]
    model.config.save_pretrained(tmp_path)
    assert "linear_value_to_key_head" not in json.loads((tmp_path / "config.json").read_text())


def test_kimi_float32_parameters_are_saved_unrounded(tmp_path):
    """Kimi Linear keeps ``dt_bias`` and its routers in float32 in a bfloat16 checkpoint
    (``_keep_in_fp32_modules_strict``): the pruned folder stores the kept values in float32, unrounded, as
    loading gives them (Kimi Linear exports from memory only)."""
    from conftest import invoke
    from safetensors.torch import load_file, save_file
    from tiny_hybrids import EVAL_TEXT, saved_tiny_hybrid

    source = saved_tiny_hybrid("kimi_linear", tmp_path / "source")
    weights = load_file(source / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    for name, tensor in weights.items():
        if tensor.is_floating_point():
            kept = any(part in name for part in ("dt_bias", "moe.gate.weight", "e_score_correction_bias"))
            weights[name] = torch.randn(tensor.shape, generator=generator).to(torch.float32 if kept else torch.bfloat16)
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    float32 = sorted(name for name, tensor in weights.items() if tensor.dtype == torch.float32)
    assert any("dt_bias" in name for name in float32) and any("moe.gate.weight" in name for name in float32)
    out = tmp_path / "pruned"
    result = invoke("prune", source, "--out", out, "--state-reduction", 0.4, "--method", "norm", "--remove", "low",
                    "--samples", 2, "--seq-len", 64, "--device", "cpu", "--eval", EVAL_TEXT,
                    "--eval-samples", 1, "--eval-seq-len", 64)
    assert result.exit_code == 0, result.output
    written = {}
    for file in out.glob("*.safetensors"):
        written.update(load_file(file))
    layers = json.loads((out / "compression.json").read_text())["layers"]
    for name in float32:
        assert written[name].dtype == torch.float32, name
        if "dt_bias" in name:
            layer = name.split(".")[2]
            per_head = weights[name].view(config["linear_num_heads"], config["linear_head_dim"])
            expected = per_head[layers[layer]["kept_heads"]].flatten()
        else:
            expected = weights[name]
        assert torch.equal(written[name], expected), name
    assert all(t.dtype == torch.bfloat16 for n, t in written.items() if n not in float32 and t.is_floating_point())
