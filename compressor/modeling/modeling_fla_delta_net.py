"""fla's DeltaNet (``delta_net``) with per-layer heads and CPU tensors routed to PyTorch.

Shipped in output folders (auto_map). DeltaNet sizes its heads through ``expand_k``/``expand_v`` (key width
hidden_size · expand_k, split into ``num_heads`` heads), so a layer with fewer heads gets ``num_heads``,
``expand_k`` and ``expand_v`` in ``config.per_layer_config[i]``. Every head has its own key head.

Importing this file registers its model class for fla's config and for the per-layer config below (auto_map's
AutoConfig imports it first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fla.layers.delta_net import DeltaNet
from fla.layers.utils import get_layer_cache
from fla.models.delta_net import DeltaNetConfig, DeltaNetForCausalLM

from .delta_rule import delta_rule
from .fla_layers import (
    FlaMixerMixin,
    PrunedFlaForCausalLMMixin,
    register_classes,
    route_to_torch,
)
from .packed_heads import sigmoid_head_major

FIELDS = {"num_key_heads": "num_heads", "num_value_heads": "num_heads", "key_dim": "head_dim", "value_dim": "head_dim",
          "value_to_key": "value_to_key_head", "query_scale": "query_scale"}


class PrunedFlaDeltaNet(FlaMixerMixin, DeltaNet):
    """fla's DeltaNet layer built from a (per-layer) config; ``out_proj`` names fla's ``o_proj``."""

    recurrence = staticmethod(delta_rule)

    def __init__(self, config, layer_idx: int):
        super().__init__(
            mode=config.attn_mode, hidden_size=config.hidden_size, expand_k=config.expand_k,
            expand_v=config.expand_v, num_heads=config.num_heads, use_gate=config.use_gate,
            use_beta=config.use_beta, use_short_conv=config.use_short_conv,
            allow_neg_eigval=config.allow_neg_eigval, conv_size=config.conv_size, qk_norm=config.qk_norm,
            qk_activation=config.qk_activation, norm_eps=config.norm_eps, layer_idx=layer_idx,
        )
        route_to_torch(self)

    @property
    def num_v_heads(self) -> int:
        return self.num_heads

    @property
    def normalises_convolved_keys(self) -> bool:
        """The L2 norm of q and k follows their convolutions directly where no relu or elu comes between."""
        return self.qk_norm == "l2" and self.qk_activation in ("silu", "identity")

    def unconvolved(self, q, k, v):
        """Without short convolutions: silu on v, and on q and k for the silu feature map."""
        if self.qk_activation == "silu":
            q, k = F.silu(q), F.silu(k)
        return q, k, F.silu(v)

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False, **kwargs):
        """hidden [B, T, D] -> (out [B, T, D], None, cache)."""
        hidden_states = self.unpadded(hidden_states, attention_mask)
        last_state = get_layer_cache(self, past_key_values)
        q, k, v, conv_states, normalised = self.qkv_heads(hidden_states, last_state, use_cache)
        if self.qk_activation == "relu":
            q, k = q.relu(), k.relu()
        elif self.qk_activation == "elu":
            q, k = F.elu(q) + 1, F.elu(k) + 1
        if self.qk_norm == "sum":
            q, k = (F.normalize(x.float(), p=1, dim=-1, eps=1e-6).to(x.dtype) for x in (q, k))
        beta = sigmoid_head_major(self.b_proj(hidden_states)) if self.use_beta else torch.ones_like(q[..., 0])
        if self.allow_neg_eigval:
            beta = beta * 2.0
        out, final_state = self.recurrence(
            q, k, v, beta, use_qk_l2norm=self.qk_norm == "l2" and not normalised,
            initial_state=last_state["recurrent_state"] if last_state is not None else None,
            output_final_state=bool(use_cache), scale=self.query_scale,
        )
        out = self.finish(out, hidden_states, past_key_values, final_state, conv_states)
        return out, None, past_key_values


class PrunedDeltaNetForCausalLM(PrunedFlaForCausalLMMixin, DeltaNetForCausalLM):
    """DeltaNetForCausalLM whose layers read their heads from ``config.per_layer_config``; CPU tensors never
    reach Triton."""

    mixer_class = PrunedFlaDeltaNet
    head_fields = FIELDS


DeltaNetPerLayerConfig = register_classes(DeltaNetConfig, PrunedDeltaNetForCausalLM)
