"""fla's Gated Linear Attention (``gla``): separate q, k, v, g projections, a low-rank key-channel gate whose second
factor holds each head's channels, and optional q/k/v short convolutions; heads sized through expand_k/expand_v."""

from ..modeling.modeling_fla_gla import FIELDS, GLAConfig, GLAPerLayerConfig, PrunedFlaGLA, PrunedGLAForCausalLM
from .base import K, V, ConfigFields, Family, Flat, HeadLayout, columns, rows
from .fla_delta_net import expand_fields


def gla_fields(config, layout: HeadLayout) -> dict:
    """``expand_fields``, and ``num_kv_heads`` when the source config sets it (it must equal num_heads)."""
    fields = expand_fields(config, layout)
    if config.num_kv_heads is not None:
        fields["num_kv_heads"] = layout.num_key_heads
    return fields


FLA_GLA = Family(
    name="fla GLA",
    model_types=("gla", "gla_per_layer"),
    mixer_attr="attn",
    tensors={
        "q_proj.weight": rows(Flat((K,))),
        "k_proj.weight": rows(Flat((K,))),
        "v_proj.weight": rows(Flat((V,))),
        "g_proj.weight": rows(Flat((V,))),
        "gk_proj.1.weight": rows(Flat((K,))),
        "gk_proj.1.bias": rows(Flat((K,))),
        "q_conv1d.weight": rows(Flat((K,))),
        "k_conv1d.weight": rows(Flat((K,))),
        "v_conv1d.weight": rows(Flat((V,))),
        "o_proj.weight": columns(Flat((V,))),
    },
    shared=("gk_proj.0.weight", "g_norm_swish_gate.weight", "g_norm.weight"),
    modeling_file="modeling_fla_gla.py",
    model_class=PrunedGLAForCausalLM,
    mixer_class=PrunedFlaGLA,
    fields=ConfigFields(**FIELDS),
    config_class=GLAConfig,
    per_layer_config_class=GLAPerLayerConfig,
    layer_fields=gla_fields,
)
