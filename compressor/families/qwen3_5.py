"""Qwen3.5 (``qwen3_5_text``): separate q|k|v, z, b, a projections, each laid out head after head."""

from ..modeling.modeling_qwen3_5 import PrunedQwen3_5ForCausalLM, PrunedQwen3_5GatedDeltaNet
from .base import K, ONE, V, Family, Flat, columns, rows

QK = (K, K)

QWEN3_5 = Family(
    name="Qwen3.5",
    model_types=("qwen3_5_text",),
    mixer_attr="linear_attn",
    tensors={
        "in_proj_qkv.weight": rows(Flat((*QK, V))),
        "conv1d.weight": rows(Flat((*QK, V))),
        "in_proj_z.weight": rows(Flat((V,))),
        "in_proj_b.weight": rows(Flat((ONE,))),
        "in_proj_a.weight": rows(Flat((ONE,))),
        "dt_bias": rows(Flat((ONE,))),
        "A_log": rows(Flat((ONE,))),
        "out_proj.weight": columns(Flat((V,))),
    },
    shared=("norm.weight",),
    modeling_file="modeling_qwen3_5.py",
    model_class=PrunedQwen3_5ForCausalLM,
    query_key=("in_proj_qkv.weight",),
    mixer_class=PrunedQwen3_5GatedDeltaNet,
)
