"""Qwen3.5 (``qwen3_5_text``) with per-layer linear-attention heads. Shipped in output folders (auto_map)."""

from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5ForCausalLM, Qwen3_5GatedDeltaNet

from .gated_deltanet import PrunableGatedDeltaNetMixin, global_head_counts, install_mixers
from .stock_dispatch import HubKernelsOffByDefault


class PrunedQwen3_5GatedDeltaNet(PrunableGatedDeltaNetMixin, Qwen3_5GatedDeltaNet):
    """Qwen3.5's mixer: separate q|k|v, z, b and a projections, each laid out head after head."""

    def project(self, hidden_states):
        return (
            self.in_proj_qkv(hidden_states),
            self.in_proj_z(hidden_states),
            self.in_proj_b(hidden_states),
            self.in_proj_a(hidden_states),
        )


class PrunedQwen3_5ForCausalLM(HubKernelsOffByDefault, Qwen3_5ForCausalLM):
    """Qwen3_5ForCausalLM whose linear-attention layers read their heads from ``config.per_layer_config``."""

    def __init__(self, config):
        with global_head_counts(config):
            super().__init__(config)
        install_mixers(self, PrunedQwen3_5GatedDeltaNet)
