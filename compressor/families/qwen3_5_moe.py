"""Qwen3.5-MoE (``qwen3_5_moe_text``): the same Gated DeltaNet head layout as Qwen3.5, with MoE MLPs."""

from ..modeling.modeling_qwen3_5_moe import PrunedQwen3_5MoeForCausalLM, PrunedQwen3_5MoeGatedDeltaNet
from .base import Family
from .qwen3_5 import QWEN3_5

QWEN3_5_MOE = Family(
    name="Qwen3.5-MoE",
    model_types=("qwen3_5_moe_text",),
    mixer_attr="linear_attn",
    tensors=QWEN3_5.tensors,
    shared=QWEN3_5.shared,
    modeling_file="modeling_qwen3_5_moe.py",
    model_class=PrunedQwen3_5MoeForCausalLM,
    query_key=QWEN3_5.query_key,
    mixer_class=PrunedQwen3_5MoeGatedDeltaNet,
)
