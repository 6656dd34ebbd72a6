"""Qwen3-Next (``qwen3_next``): fused projections grouped by key head, [q_g | k_g | v_{V_g} | z_{V_g}] and
[b_{V_g} | a_{V_g}]; the short convolution holds [q all | k all | v all]."""

from ..modeling.modeling_qwen3_next import PrunedQwen3NextForCausalLM, PrunedQwen3NextGatedDeltaNet
from .base import K, ONE, V, Family, Flat, Grouped, columns, rows

QWEN3_NEXT = Family(
    name="Qwen3-Next",
    model_types=("qwen3_next",),
    mixer_attr="linear_attn",
    tensors={
        "in_proj_qkvz.weight": rows(Grouped((K, K, V, V))),
        "in_proj_ba.weight": rows(Grouped((ONE, ONE))),
        "conv1d.weight": rows(Flat((K, K, V))),
        "dt_bias": rows(Flat((ONE,))),
        "A_log": rows(Flat((ONE,))),
        "out_proj.weight": columns(Flat((V,))),
    },
    shared=("norm.weight",),
    modeling_file="modeling_qwen3_next.py",
    model_class=PrunedQwen3NextForCausalLM,
    query_key=("in_proj_qkvz.weight",),
    mixer_class=PrunedQwen3NextGatedDeltaNet,
)
