"""fla's models — Gated DeltaNet (``gated_deltanet``, grouped value heads included), DeltaNet (``delta_net``),
Gated Linear Attention (``gla``) and Kimi Delta Attention (``kda``): removing heads equals masking them, head
counts reach the config, folders reload without compressor, cached generation, ``compress prune`` end to end, and
the refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fresh_process import reloaded_logits
from tiny_fla import (
    CONFIGS,
    check_cli_prune,
    check_reload_without_compressor,
    check_removal_equals_masking,
    input_ids,
    plans_for,
    tiny_fla_model,
)
from tiny_hybrids import check_exact_in_float64
from tiny_models import check_cached_generation, recurrence_inputs

from compressor.errors import CompressorError
from compressor.export import write_model
from compressor.families import family_for
from compressor.loading import load_model
from compressor.layers import PruningPlan
from compressor.slicing import slim

NAMES = list(CONFIGS)  # two configs of each family
FAMILY_EXAMPLES = ["gated_deltanet_gva", "delta_net", "gla", "kda_gva"]


@pytest.mark.parametrize("plan_name", ["uneven", "single-and-odd", "even-uniform"])
@pytest.mark.parametrize("config_name", NAMES)
def test_removing_heads_equals_masking_them(config_name, plan_name):
    check_removal_equals_masking(config_name, plan_name)


@pytest.mark.parametrize("plan_name", ["uneven", "single-and-odd", "even-uniform"])
@pytest.mark.parametrize("config_name", NAMES)
def test_removal_is_exact_in_float64(config_name, plan_name):
    check_exact_in_float64(tiny_fla_model(config_name), plans_for(config_name)[plan_name], input_ids(1))


@pytest.mark.parametrize("config_name", NAMES)
def test_cached_generation_matches_the_masked_model(config_name):
    model = tiny_fla_model(config_name)
    check_cached_generation(model, plans_for(config_name)["single-and-odd"], input_ids(2)[:, :70])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gated_deltanet", "delta_net", "gla", "kda"])
def test_saved_folders_reload_without_compressor(family, tmp_path):
    """A fresh process loads an uneven and an even-uniform folder of both configs of one family. One process per
    family: once fla is imported, an even-uniform (stock) config of another family loads into fla's own class,
    which is right for a stock checkpoint but calls Triton on CPU."""
    check_reload_without_compressor([name for name in NAMES if name.startswith(family)], tmp_path)


@pytest.mark.slow
def test_per_layer_folders_load_with_their_code_after_import_fla(tmp_path):
    """transformers prefers a registered class to a folder's auto_map, and importing fla registers fla's classes
    for fla's model types: folders with per-layer heads carry a model type of their own, so their shipped code
    loads them all the same, in a process where compressor cannot be imported."""
    ids = input_ids(6)
    expected = {}
    for config_name in FAMILY_EXAMPLES:
        model = tiny_fla_model(config_name)
        family = family_for(model.config)
        slim(model, family, PruningPlan(kept=plans_for(config_name)["uneven"]))
        write_model(model, family, tmp_path / config_name)
        with torch.no_grad():
            expected[config_name] = model(ids).logits
    reloaded = reloaded_logits(FAMILY_EXAMPLES, ids, tmp_path, generate=False, checks="""
        assert type(model).__name__.startswith("Pruned"), type(model)
        assert model.config.model_type.endswith("_per_layer"), model.config.model_type
        """, prelude="import fla  # registers fla's own classes for gated_deltanet, delta_net, gla and kda\n")
    for name, logits in expected.items():
        assert (reloaded[name] - logits).abs().max().item() <= 1e-4, name


@pytest.mark.parametrize("config_name", FAMILY_EXAMPLES)
def test_compress_prune_end_to_end(config_name, tmp_path):
    check_cli_prune(config_name, tmp_path)


@pytest.mark.parametrize("config_name", ["gated_deltanet_gva", "kda_gva"])
def test_uneven_groups_get_an_explicit_head_map(config_name):
    model = tiny_fla_model(config_name)
    slim(model, family_for(model.config), PruningPlan(kept={0: [0, 1, 2, 4], 1: [1, 5], 2: list(range(6))}))
    layer0, layer1 = model.config.per_layer_config[0], model.config.per_layer_config[1]
    assert (layer0.num_heads, layer0.num_v_heads, layer0.value_to_key_head) == (3, 4, [0, 0, 1, 2])
    assert (layer1.num_heads, layer1.num_v_heads, layer1.value_to_key_head) == (2, 2, None)
    mixer = model.model.layers[0].attn
    assert mixer.q_proj.weight.shape[0] == 3 * 8
    if config_name == "kda_gva":
        assert mixer.v_proj.weight.shape[0] == 4 * 12
        assert mixer.f_proj[1].weight.shape[0] == mixer.dt_bias.shape[0] == 4 * 8  # per value head and key channel


@pytest.mark.parametrize("config_name", ["delta_net", "gla"])
def test_head_counts_go_through_expand_k_and_expand_v(config_name):
    model = tiny_fla_model(config_name)
    slim(model, family_for(model.config), PruningPlan(kept={0: [0, 2, 3], 1: [1], 2: [0, 1, 2, 3]}))
    layer0, layer1 = model.config.per_layer_config[0], model.config.per_layer_config[1]
    assert (layer0.num_heads, layer0.expand_k, layer0.expand_v) == (3, 3 * 8 / 64, 3 * 16 / 64)
    assert (layer1.num_heads, layer1.expand_k, layer1.expand_v) == (1, 8 / 64, 16 / 64)
    mixer = model.model.layers[0].attn
    assert (mixer.head_k_dim, mixer.head_v_dim, mixer.key_dim, mixer.value_dim) == (8, 16, 24, 48)
    if config_name == "gla":
        assert mixer.gk_proj[1].weight.shape == (24, 16) and mixer.gk_proj[0].weight.shape == (16, 64)


@pytest.mark.parametrize("config_name", ["gated_deltanet_gva", "kda_gva"])
def test_padded_positions_leave_the_others_unchanged(config_name):
    """Left padding (attention_mask 0) gives the unpadded sequence's logits at the real positions."""
    model = tiny_fla_model(config_name)
    ids = torch.randint(3, 96, (1, 40), generator=torch.Generator().manual_seed(5))
    padded = torch.cat([torch.zeros(1, 7, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 7, dtype=torch.long), torch.ones(1, 40, dtype=torch.long)], dim=1)
    with torch.no_grad():
        plain = model(ids).logits
        left = model(padded, attention_mask=mask).logits[:, 7:]
    assert (plain - left).abs().max().item() <= 1e-4


def fla_gates(name: str, mixer, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The decay and write strength of fla's layer definitions, written out from its parameters: hidden [B, T, D] ->
    GLA: (gk [B, T, H, d_k],); DeltaNet: (beta [B, T, H],); the gated delta rules: (g [B, T, H] or [B, T, H, d_k],
    beta [B, T, H])."""
    batch, length, _ = hidden.shape
    if name.startswith("delta_net"):
        return (mixer.b_proj(hidden).sigmoid() * (2.0 if mixer.allow_neg_eigval else 1.0),)
    if name.startswith("gla"):
        gk = F.logsigmoid(mixer.gk_proj(hidden).reshape(batch, length, mixer.num_heads, -1))
        gk = gk / mixer.gate_logit_normalizer
        return (gk if mixer.clamp_min is None else gk.clamp_min(mixer.clamp_min),)
    beta = mixer.b_proj(hidden).sigmoid() * (2.0 if mixer.allow_neg_eigval else 1.0)
    rate = mixer.A_log.exp()
    if name.startswith("kda"):
        f = mixer.f_proj(hidden).reshape(batch, length, mixer.num_v_heads, -1) + mixer.dt_bias.view(rate.shape[0], -1)
        if mixer.lower_bound is not None:
            return mixer.lower_bound * torch.sigmoid(rate[:, None] * f), beta
        return -rate[:, None] * F.softplus(f), beta
    return -rate * F.softplus(mixer.a_proj(hidden) + mixer.dt_bias), beta


@pytest.mark.parametrize("config_name", ["gated_deltanet_gva", "gated_deltanet_gva+neg", "gla", "gla_conv_relu",
                                         "kda_gva", "kda_safe_gate", "delta_net", "delta_net_relu_sum"])
def test_the_gates_reaching_the_recurrence_are_fla_s(config_name):
    """The decay (and beta; DeltaNet's beta alone) the shipped forward hands its recurrence equal fla's formulas on the
    layer's input (GLA's clamp set where it binds; "+neg": beta in (0, 2), scaled once)."""
    name, _, negative = config_name.partition("+")
    model = tiny_fla_model(name, **({"allow_neg_eigval": True} if negative else {}))
    mixer = model.model.layers[1].attn
    if config_name == "gla_conv_relu":
        mixer.clamp_min = -0.05
    hidden, gates = recurrence_inputs(model, mixer, input_ids())
    with torch.no_grad():
        expected = fla_gates(config_name, mixer, hidden)
    assert len(gates) == len(expected)
    for got, want in zip(gates, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    if not config_name.startswith("gla"):  # the decay (DeltaNet: beta) arrives head-major, so packing takes a view
        assert gates[0].transpose(1, 2).is_contiguous()  # (GLA's comes from CPU's logsigmoid: contiguous memory)
    if len(gates) > 1:  # and so does beta
        assert gates[1].transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("config_name", ["gated_deltanet_gva", "kda_gva", "kda_safe_gate"])
def test_a_float64_model_hands_its_recurrence_a_float64_decay(config_name):
    """The decay follows dt_bias's precision (exp(A_log) is taken in float32, as fla takes it)."""
    model = tiny_fla_model(config_name).double()
    mixer = model.model.layers[1].attn
    hidden, (g, _) = recurrence_inputs(model, mixer, input_ids())
    with torch.no_grad():
        expected = fla_gates(config_name, mixer, hidden)[0]
    assert g.dtype == torch.float64
    torch.testing.assert_close(g, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("normalizer", [16, 3])
def test_gla_s_key_decay_is_the_stock_layer_s_in_bfloat16(grad, normalizer):
    """In bf16 GLA's decay is fla's layer's bit for bit, in bf16 (a power-of-two normalizer divides exactly, another
    rounds as the stock layer rounds), with and without autograd, head-major where the packed layout takes it."""
    mixer = tiny_fla_model("gla").to(torch.bfloat16).model.layers[1].attn
    mixer.gate_logit_normalizer = normalizer
    gk = torch.randn(2, 7, mixer.num_heads, mixer.head_k_dim, generator=torch.Generator().manual_seed(6))
    gk = gk.to(torch.bfloat16)
    with torch.set_grad_enabled(grad):
        got = mixer.key_decay(gk)
    expected = F.logsigmoid(gk) / normalizer
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
    assert got.transpose(1, 2).is_contiguous()
    with torch.no_grad():
        token_major = mixer.key_decay(gk, token_major=True)
    assert token_major.is_contiguous() and torch.equal(token_major, expected)


@pytest.mark.parametrize("config_name", ["kda_gva", "kda_safe_gate"])
def test_kda_s_decay_under_autograd_equals_the_one_outside_it(config_name):
    """KDA's decay takes one path under autograd (no ``out``, nothing kept) and another outside it; both must give
    the values fla's formula gives (checked outside autograd above), and autograd must reach A_log and dt_bias."""
    mixer = tiny_fla_model(config_name).model.layers[1].attn
    f = torch.randn(2, 7, mixer.num_v_heads, mixer.head_k_dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        outside = mixer.channel_decay(f)
    under = mixer.channel_decay(f)
    under.sum().backward()
    torch.testing.assert_close(under.detach(), outside, rtol=1e-6, atol=1e-7)
    assert mixer.A_log.grad is not None and mixer.dt_bias.grad is not None


def test_hybrid_with_attention_layers_is_refused(tmp_path):
    CONFIGS["gated_deltanet"](attn={"layers": [1], "num_heads": 2}).save_pretrained(tmp_path)
    with pytest.raises(CompressorError, match="full-attention layers"):
        load_model(str(tmp_path), device="cpu")


def test_gla_shared_key_value_heads_are_refused(tmp_path):
    CONFIGS["gla"](num_kv_heads=2).save_pretrained(tmp_path)
    with pytest.raises(CompressorError, match="num_kv_heads < num_heads"):
        load_model(str(tmp_path), device="cpu")


def test_fla_model_without_usable_fla_is_refused_with_what_to_install(tmp_path, monkeypatch):
    import compressor.families.fla_support as fla_support

    CONFIGS["gated_deltanet"]().save_pretrained(tmp_path)
    monkeypatch.setattr(fla_support, "FLA_IMPORT_ERROR", ImportError("No module named 'triton'"))
    with pytest.raises(CompressorError, match="pip install flash-linear-attention triton"):
        load_model(str(tmp_path), device="cpu")


def test_after_import_compressor_folders_load_without_trust_remote_code(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_fla_model("gated_deltanet_gva")
    family = family_for(model.config)
    slim(model, family, PruningPlan(kept=plans_for("gated_deltanet_gva")["uneven"]))
    write_model(model, family, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(reloaded) is family.model_class
    with torch.no_grad():
        assert (reloaded(input_ids(4)).logits - model(input_ids(4)).logits).abs().max().item() <= 1e-4
