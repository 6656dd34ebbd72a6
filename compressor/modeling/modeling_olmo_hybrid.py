"""OLMo-Hybrid (``olmo_hybrid``) with per-layer linear-attention heads. Shipped in output folders (auto_map).

Its Gated DeltaNet mixer has separate q, k, v, g (output gate), a and b projections, an output projection named
``o_proj`` and a gated norm named ``o_norm``; with ``linear_allow_neg_eigval`` the write strength beta is
2·sigmoid(b), in [0, 2].
"""

import torch
from transformers.models.olmo_hybrid.modeling_olmo_hybrid import OlmoHybridForCausalLM, OlmoHybridGatedDeltaNet

from .gated_deltanet import PrunableGatedDeltaNetMixin, global_head_counts, install_mixers
from .stock_dispatch import HubKernelsOffByDefault


class PrunedOlmoHybridGatedDeltaNet(PrunableGatedDeltaNetMixin, OlmoHybridGatedDeltaNet):
    """OLMo-Hybrid's mixer; ``out_proj`` and ``norm`` name its ``o_proj`` and ``o_norm``."""

    @property
    def out_proj(self) -> torch.nn.Linear:
        """The output projection [hidden, H_v·d_v]; its input columns are contiguous per value head."""
        return self.o_proj

    @property
    def norm(self) -> torch.nn.Module:
        return self.o_norm

    def project(self, hidden_states):
        mixed_qkv = torch.cat([self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)], -1)
        return mixed_qkv, self.g_proj(hidden_states), self.b_proj(hidden_states), self.a_proj(hidden_states)


class PrunedOlmoHybridForCausalLM(HubKernelsOffByDefault, OlmoHybridForCausalLM):
    """OlmoHybridForCausalLM whose linear-attention layers read their heads from ``config.per_layer_config``."""

    def __init__(self, config):
        with global_head_counts(config):
            super().__init__(config)
        install_mixers(self, PrunedOlmoHybridGatedDeltaNet)
