"""Qwen3.5-MoE (``qwen3_5_moe_text``) with per-layer linear-attention heads. Shipped in output folders (auto_map).

Its Gated DeltaNet mixer is Qwen3.5's (separate q|k|v, z, b and a projections); only the MLPs differ.
"""

from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeForCausalLM, Qwen3_5MoeGatedDeltaNet

from .gated_deltanet import PrunableGatedDeltaNetMixin, global_head_counts, install_mixers
from .stock_dispatch import HubKernelsOffByDefault, StockExpertsDispatch


class PrunedQwen3_5MoeGatedDeltaNet(PrunableGatedDeltaNetMixin, Qwen3_5MoeGatedDeltaNet):
    """Qwen3.5-MoE's mixer: separate q|k|v, z, b and a projections, each laid out head after head."""

    def project(self, hidden_states):
        return (
            self.in_proj_qkv(hidden_states),
            self.in_proj_z(hidden_states),
            self.in_proj_b(hidden_states),
            self.in_proj_a(hidden_states),
        )


class PrunedQwen3_5MoeForCausalLM(HubKernelsOffByDefault, StockExpertsDispatch, Qwen3_5MoeForCausalLM):
    """Qwen3_5MoeForCausalLM whose linear-attention layers read their heads from ``config.per_layer_config``."""

    def __init__(self, config):
        with global_head_counts(config):
            super().__init__(config)
        install_mixers(self, PrunedQwen3_5MoeGatedDeltaNet)
