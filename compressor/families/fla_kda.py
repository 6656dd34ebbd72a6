"""fla's Kimi Delta Attention (``kda``): separate q, k, v, b projections and q/k/v short convolutions head after
head; low-rank decay (f_proj) and output-gate (g_proj) projections whose second factors hold each value head's
rows; ``dt_bias`` has one entry per value head and key channel. Value head j reads key head j // r."""

from ..modeling.modeling_fla_kda import FIELDS, KDAConfig, KDAPerLayerConfig, PrunedFlaKDA, PrunedKDAForCausalLM
from .base import K, ONE, V, VALUE_K, ConfigFields, Family, Flat, columns, rows
from .fla_gated_deltanet import head_dim_fields


FLA_KDA = Family(
    name="fla KDA",
    model_types=("kda", "kda_per_layer"),
    mixer_attr="attn",
    tensors={
        "q_proj.weight": rows(Flat((K,))),
        "k_proj.weight": rows(Flat((K,))),
        "v_proj.weight": rows(Flat((V,))),
        "q_conv1d.weight": rows(Flat((K,))),
        "k_conv1d.weight": rows(Flat((K,))),
        "v_conv1d.weight": rows(Flat((V,))),
        "f_proj.1.weight": rows(Flat((VALUE_K,))),
        "dt_bias": rows(Flat((VALUE_K,))),
        "A_log": rows(Flat((ONE,))),
        "b_proj.weight": rows(Flat((ONE,))),
        "g_proj.1.weight": rows(Flat((V,))),
        "g_proj.1.bias": rows(Flat((V,))),
        "o_proj.weight": columns(Flat((V,))),
    },
    shared=("f_proj.0.weight", "g_proj.0.weight", "o_norm.weight"),
    modeling_file="modeling_fla_kda.py",
    model_class=PrunedKDAForCausalLM,
    mixer_class=PrunedFlaKDA,
    fields=ConfigFields(**FIELDS),
    config_class=KDAConfig,
    per_layer_config_class=KDAPerLayerConfig,
    layer_fields=head_dim_fields,
)
