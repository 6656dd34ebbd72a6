"""fla's Gated DeltaNet (``gated_deltanet``) with per-layer heads and CPU tensors routed to PyTorch.

Shipped in output folders (auto_map). Per-layer head counts come from ``config.per_layer_config[i]``
(``num_heads`` key heads, ``num_v_heads`` value heads, ``value_to_key_head``: the key head of each value head
when the stock grouping j // r does not describe it). Value head j reads key head ``value_to_key[j]``.

Importing this file registers its model class for fla's config and for the per-layer config below (auto_map's
AutoConfig imports it first).
"""

from __future__ import annotations

from fla.layers.gated_deltanet import GatedDeltaNet
from fla.layers.utils import get_layer_cache
from fla.models.gated_deltanet import GatedDeltaNetConfig, GatedDeltaNetForCausalLM
from fla.modules import ShortConvolution
import torch
from torch import nn

from .fla_layers import (
    FlaMixerMixin,
    PrunedFlaForCausalLMMixin,
    register_classes,
    route_to_torch,
)
from .gated_delta import direct_chunked, gated_delta_rule, shared_key_gated_delta_rule
from .head_gate import takes as head_gate_takes

FIELDS = {"num_key_heads": "num_heads", "num_value_heads": "num_v_heads", "key_dim": "head_dim", "value_dim": "head_dim",
          "value_to_key": "value_to_key_head", "query_scale": "query_scale"}


class PrunedFlaGatedDeltaNet(FlaMixerMixin, GatedDeltaNet):
    """fla's GatedDeltaNet layer; any number of value heads per key head; ``out_proj`` names fla's ``o_proj``."""

    recurrence = staticmethod(gated_delta_rule)
    beta_in_float32 = True  # as fla's kernels apply the sigmoid

    def __init__(self, config, layer_idx: int):
        num_heads = config.num_heads
        num_v_heads = config.num_v_heads or num_heads
        # fla insists on num_v_heads % num_heads == 0; uneven pruned groups are built with one key head, then resized.
        built_heads = num_heads if num_v_heads % num_heads == 0 else 1
        super().__init__(
            hidden_size=config.hidden_size, expand_v=config.expand_v, head_dim=config.head_dim,
            num_heads=built_heads, num_v_heads=num_v_heads, mode=config.attn_mode, use_gate=config.use_gate,
            use_short_conv=config.use_short_conv, allow_neg_eigval=config.allow_neg_eigval,
            conv_size=config.conv_size, layer_idx=layer_idx, norm_eps=config.norm_eps,
            output_gate_activation=getattr(config, "output_gate_activation", "swish"),
        )
        if built_heads != num_heads:
            self.num_heads, self.key_dim = num_heads, num_heads * self.head_k_dim
            self.q_proj = nn.Linear(self.hidden_size, self.key_dim, bias=False)
            self.k_proj = nn.Linear(self.hidden_size, self.key_dim, bias=False)
            if self.use_short_conv:
                self.q_conv1d = ShortConvolution(self.key_dim, self.conv_size, bias=self.conv_bias, activation="silu")
                self.k_conv1d = ShortConvolution(self.key_dim, self.conv_size, bias=self.conv_bias, activation="silu")
        route_to_torch(self)

    def shared_key_ratio(self, a: torch.Tensor, b: torch.Tensor) -> int:
        """``FlaMixerMixin.shared_key_ratio`` where the gates (a, b [B, T, H_v]) take one ``head_gates`` launch in
        float32 and fla's direct chunked forward runs on the key heads (``shared_key_gated_delta_rule``), else 1."""
        if not (head_gate_takes(a, b, torch.promote_types(self.dt_bias.dtype, torch.float32)) and a.shape[1] > 1):
            return 1
        ratio = super().shared_key_ratio(a)
        return ratio if direct_chunked(a, a.shape[0], a.shape[2], ratio) else 1

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False, **kwargs):
        """hidden [B, T, D] -> (out [B, T, D], None, cache)."""
        hidden_states = self.unpadded(hidden_states, attention_mask)
        last_state = get_layer_cache(self, past_key_values)
        a, b = self.a_proj(hidden_states), self.b_proj(hidden_states)
        ratio = self.shared_key_ratio(a, b)
        q, k, v, conv_states, normalised = self.qkv_heads(hidden_states, last_state, use_cache, ratio)
        options = dict(initial_state=last_state["recurrent_state"] if last_state is not None else None,
                       output_final_state=bool(use_cache), scale=self.query_scale)
        if ratio > 1:
            beta, g = self.gates(a, b, ratio)
            out, final_state = shared_key_gated_delta_rule(q, k, v, g, beta, **options)
        else:
            beta, g = self.gates(a, b)
            out, final_state = self.recurrence(q, k, v, g, beta, **options, use_qk_l2norm=not normalised)
        out = self.finish(out, hidden_states, past_key_values, final_state, conv_states)
        return out, None, past_key_values


class PrunedGatedDeltaNetForCausalLM(PrunedFlaForCausalLMMixin, GatedDeltaNetForCausalLM):
    """GatedDeltaNetForCausalLM whose layers read their heads from ``config.per_layer_config``; CPU tensors never
    reach Triton."""

    mixer_class = PrunedFlaGatedDeltaNet
    head_fields = FIELDS


GatedDeltaNetPerLayerConfig = register_classes(GatedDeltaNetConfig, PrunedGatedDeltaNetForCausalLM)
