"""Kimi Linear (``kimi_linear``): KDA layers (one key head per value head, d_k = d_v) between MLA attention layers.

Per head: rows of ``q_proj``, ``k_proj``, ``v_proj`` and their conv channels ([q all | k all | v all]); the
per-channel decay's second low-rank factor ``forget_gate.f_b_proj`` and ``forget_gate.dt_bias`` (head × d_k);
``forget_gate.A_log`` (shape [1, 1, H, 1], axis 2); ``b_proj``; the output gate's second factor ``g_b_proj``
(head × d_v); ``o_proj`` columns. The first low-rank factors and ``o_norm`` are shared.
"""

from transformers import AutoConfig

from ..modeling.modeling_kimi_linear import (
    FIELDS,
    PrunedKimiDeltaAttention,
    PrunedKimiLinearConfig,
    PrunedKimiLinearForCausalLM,
)
from .base import K, ONE, V, ConfigFields, Family, Flat, TensorLayout, columns, rows


KIMI_LINEAR = Family(
    name="Kimi Linear",
    model_types=("kimi_linear",),
    mixer_attr="self_attn",
    linear_layer_type="linear_attention",
    tensors={
        "q_proj.weight": rows(Flat((K,))),
        "k_proj.weight": rows(Flat((K,))),
        "v_proj.weight": rows(Flat((V,))),
        "conv1d.weight": rows(Flat((K, K, V))),
        "forget_gate.f_b_proj.weight": rows(Flat((K,))),
        "forget_gate.dt_bias": rows(Flat((K,))),
        "forget_gate.A_log": TensorLayout(2, (Flat((ONE,)),)),
        "b_proj.weight": rows(Flat((ONE,))),
        "g_b_proj.weight": rows(Flat((V,))),
        "o_proj.weight": columns(Flat((V,))),
    },
    shared=("forget_gate.f_a_proj.weight", "g_a_proj.weight", "o_norm.weight"),
    modeling_file="modeling_kimi_linear.py",
    model_class=PrunedKimiLinearForCausalLM,
    mixer_class=PrunedKimiDeltaAttention,
    fields=ConfigFields(**FIELDS),
    config_class=PrunedKimiLinearConfig,
    key_channels_refused="its KDA layers size queries, keys and values by one field (linear_head_dim, d_k = d_v), "
    "so a layer cannot hold fewer query/key channels than value channels",
)

# The stock config cannot hold per-layer KDA heads (see PrunedKimiLinearConfig): after ``import compressor``,
# "kimi_linear" configs are built by the shipped config class (compressor/__init__ maps it to the shipped model).
AutoConfig.register("kimi_linear", PrunedKimiLinearConfig, exist_ok=True)
