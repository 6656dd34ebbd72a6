"""fla's Gated DeltaNet (``gated_deltanet``): separate q, k, v, a, b, g projections and q/k/v short convolutions,
each laid out head after head; value head j reads key head j // (num_v_heads / num_heads)."""

from ..modeling.modeling_fla_gated_deltanet import (
    FIELDS,
    GatedDeltaNetConfig,
    GatedDeltaNetPerLayerConfig,
    PrunedFlaGatedDeltaNet,
    PrunedGatedDeltaNetForCausalLM,
)
from .base import K, ONE, V, ConfigFields, Family, Flat, HeadLayout, columns, rows


def head_dim_fields(config, layout: HeadLayout) -> dict:
    """``expand_v`` that keeps d_v = head_dim · expand_v when the key head size ``head_dim`` shrinks (the layer
    sizes its value heads through it); nothing when d_k is unchanged."""
    return {} if layout.key_dim == config.head_dim else {"expand_v": layout.value_dim / layout.key_dim}


FLA_GATED_DELTANET = Family(
    name="fla Gated DeltaNet",
    model_types=("gated_deltanet", "gated_deltanet_per_layer"),
    mixer_attr="attn",
    tensors={
        "q_proj.weight": rows(Flat((K,))),
        "k_proj.weight": rows(Flat((K,))),
        "v_proj.weight": rows(Flat((V,))),
        "g_proj.weight": rows(Flat((V,))),
        "a_proj.weight": rows(Flat((ONE,))),
        "b_proj.weight": rows(Flat((ONE,))),
        "A_log": rows(Flat((ONE,))),
        "dt_bias": rows(Flat((ONE,))),
        "q_conv1d.weight": rows(Flat((K,))),
        "k_conv1d.weight": rows(Flat((K,))),
        "v_conv1d.weight": rows(Flat((V,))),
        "o_proj.weight": columns(Flat((V,))),
    },
    shared=("o_norm.weight",),
    modeling_file="modeling_fla_gated_deltanet.py",
    model_class=PrunedGatedDeltaNetForCausalLM,
    mixer_class=PrunedFlaGatedDeltaNet,
    fields=ConfigFields(**FIELDS),
    config_class=GatedDeltaNetConfig,
    per_layer_config_class=GatedDeltaNetPerLayerConfig,
    layer_fields=head_dim_fields,
)
