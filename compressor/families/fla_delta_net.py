"""fla's DeltaNet (``delta_net``): separate q, k, v, b (and g) projections and q/k/v short convolutions, each laid
out head after head; one key head per value head. Heads are sized through ``expand_k``/``expand_v``."""

from ..modeling.modeling_fla_delta_net import (
    FIELDS,
    DeltaNetConfig,
    DeltaNetPerLayerConfig,
    PrunedDeltaNetForCausalLM,
    PrunedFlaDeltaNet,
)
from .base import K, ONE, V, ConfigFields, Family, Flat, HeadLayout, columns, rows





def expand_fields(config, layout: HeadLayout) -> dict:
    """``expand_k``/``expand_v`` that give ``layout``'s head count at the same head sizes:
    hidden_size · expand_k = num_heads · d_k (fla rounds the product, so the quotient's float error is harmless)."""
    return {"expand_k": layout.num_key_heads * layout.key_dim / config.hidden_size,
            "expand_v": layout.num_value_heads * layout.value_dim / config.hidden_size}


FLA_DELTA_NET = Family(
    name="fla DeltaNet",
    model_types=("delta_net", "delta_net_per_layer"),
    mixer_attr="attn",
    tensors={
        "q_proj.weight": rows(Flat((K,))),
        "k_proj.weight": rows(Flat((K,))),
        "v_proj.weight": rows(Flat((V,))),
        "g_proj.weight": rows(Flat((V,))),
        "b_proj.weight": rows(Flat((ONE,))),
        "q_conv1d.weight": rows(Flat((K,))),
        "k_conv1d.weight": rows(Flat((K,))),
        "v_conv1d.weight": rows(Flat((V,))),
        "o_proj.weight": columns(Flat((V,))),
    },
    shared=("o_norm.weight",),
    modeling_file="modeling_fla_delta_net.py",
    model_class=PrunedDeltaNetForCausalLM,
    mixer_class=PrunedFlaDeltaNet,
    fields=ConfigFields(**FIELDS),
    config_class=DeltaNetConfig,
    per_layer_config_class=DeltaNetPerLayerConfig,
    layer_fields=expand_fields,
)
