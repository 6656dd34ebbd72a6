"""fla's Kimi Delta Attention (``kda``) with per-layer heads and CPU tensors routed to PyTorch.

Shipped in output folders (auto_map). Per-layer head counts come from ``config.per_layer_config[i]``
(``num_heads`` key heads, ``num_v_heads`` value heads, ``value_to_key_head``: the key head of each value head
when the stock grouping j // r does not describe it). The decay has one entry per value head and key channel. The
cache keeps each state value-first ([B, H_v, d_v, d_k]), as fla's layer keeps it and its chunked kernels compute it.

Importing this file registers its model class for fla's config and for the per-layer config below (auto_map's
AutoConfig imports it first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fla.layers.kda import KimiDeltaAttention
from fla.layers.utils import get_layer_cache
from fla.models.kda import KDAConfig, KDAForCausalLM
from fla.modules import ShortConvolution
from torch import nn

from .channel_gate import DecayGate, channel_gate
from .channel_gate import takes as channel_gate_takes
from .fla_layers import (
    FlaMixerMixin,
    PrunedFlaForCausalLMMixin,
    register_classes,
    route_to_torch,
)
from .kda import direct_chunked, kimi_delta_attention, shared_key_kda
from .packed_heads import head_major, head_major_like

FIELDS = {"num_key_heads": "num_heads", "num_value_heads": "num_v_heads", "key_dim": "head_dim", "value_dim": "head_dim",
          "value_to_key": "value_to_key_head", "query_scale": "query_scale"}


class PrunedFlaKDA(FlaMixerMixin, KimiDeltaAttention):
    """fla's KimiDeltaAttention layer; any number of value heads per key head; ``out_proj`` names ``o_proj``."""

    use_gate = True  # the output gate (g_proj, sigmoid) is not optional in KDA
    recurrence = staticmethod(kimi_delta_attention)
    state_v_first = True  # the layout of the states the recurrence takes and returns, and the cache keeps
    beta_in_float32 = True  # as fla's kernels apply the sigmoid

    def __init__(self, config, layer_idx: int):
        num_heads = config.num_heads
        num_v_heads = config.num_v_heads or num_heads
        # fla insists on num_v_heads % num_heads == 0; uneven pruned groups are built with one key head, then resized.
        built_heads = num_heads if num_v_heads % num_heads == 0 else 1
        super().__init__(
            hidden_size=config.hidden_size, expand_v=config.expand_v, head_dim=config.head_dim,
            num_heads=built_heads, num_v_heads=num_v_heads, mode=config.attn_mode,
            use_short_conv=config.use_short_conv, allow_neg_eigval=config.allow_neg_eigval,
            safe_gate=config.safe_gate, lower_bound=config.lower_bound, conv_size=config.conv_size,
            norm_eps=config.norm_eps, layer_idx=layer_idx,
        )
        if built_heads != num_heads:
            self.num_heads, self.key_dim = num_heads, num_heads * self.head_k_dim
            self.q_proj = nn.Linear(self.hidden_size, self.key_dim, bias=False)
            self.k_proj = nn.Linear(self.hidden_size, self.key_dim, bias=False)
            if self.use_short_conv:
                self.q_conv1d = ShortConvolution(self.key_dim, self.conv_size, bias=self.conv_bias, activation="silu")
                self.k_conv1d = ShortConvolution(self.key_dim, self.conv_size, bias=self.conv_bias, activation="silu")
        route_to_torch(self)

    def decay_inputs(self, f: torch.Tensor) -> tuple[torch.Tensor, DecayGate | None]:
        """What the recurrence takes for the decay, from the f projection f [B, T, H_v, d_k]: where the recurrence is
        the class's own (no capture wraps it) and ``channel_gate`` takes f, (f, its gate), from which the recurrence
        computes the decay (on its chunked path straight into the chunk-local sums its kernels read, in the same
        launch); otherwise (``channel_decay(f)``, None)."""
        dtype = torch.promote_types(self.dt_bias.dtype, torch.float32)
        if "recurrence" not in vars(self) and channel_gate_takes(f, dtype):
            bias, rate, _ = self.decay_parameters(dtype)
            return f, DecayGate(bias, rate, self.lower_bound)
        return self.channel_decay(f), None

    def decay_parameters(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dt_bias [H_v, d_k], exp(A_log) [H_v, 1] (computed in float32, as fla does), its negative) in ``dtype``,
        ``kept`` outside autograd."""

        def parameters() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            rate = self.A_log.float().exp()[:, None].to(dtype)  # [H_v, 1]
            return self.dt_bias.to(dtype).view(self.num_v_heads, self.head_k_dim), rate, -rate

        return self.kept("decay", parameters, self.dt_bias, self.A_log, key=(dtype,))

    def channel_decay(self, f: torch.Tensor) -> torch.Tensor:
        """The log decay g [B, T, H_v, d_k] from the f projection f [B, T, H_v, d_k], in float32 (float64 where dt_bias
        is) and head-major (on CUDA the recurrence reads it without a copy): -exp(A_log) · softplus(f + dt_bias), or
        fla's bounded gate lower_bound · sigmoid(exp(A_log) · (f + dt_bias)). Outside autograd the result is
        written head-major, on a GPU in one launch (``channel_gate``)."""
        dtype = torch.promote_types(self.dt_bias.dtype, torch.float32)
        bias, rate, negative_rate = self.decay_parameters(dtype)
        if channel_gate_takes(f, dtype):
            return channel_gate(f, bias, rate, self.lower_bound)
        if torch.is_grad_enabled():
            f = head_major(f, dtype) + bias
            return (f * rate).sigmoid() * self.lower_bound if self.lower_bound is not None else F.softplus(f) * -rate
        out = head_major_like(f, dtype)
        if self.lower_bound is not None:
            return torch.mul((f + bias).mul_(rate).sigmoid_(), self.lower_bound, out=out)
        return torch.mul(F.softplus(f + bias), negative_rate, out=out)

    def shared_key_ratio(self, f: torch.Tensor) -> int:
        """``FlaMixerMixin.shared_key_ratio`` where the decay comes from its gate's input f [B, T, H_v, d_k] in the
        chunked sums' launch (``decay_inputs``) and fla's direct chunked forward runs (``kda.shared_key_kda``), else
        1."""
        if (f.shape[1] == 1 or not direct_chunked(f, self.head_k_dim, self.num_v_heads)
                or not channel_gate_takes(f, torch.promote_types(self.dt_bias.dtype, torch.float32))):
            return 1
        return super().shared_key_ratio(f)

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False, **kwargs):
        """hidden [B, T, D] -> (out [B, T, D], None, cache)."""
        hidden_states = self.unpadded(hidden_states, attention_mask)
        batch, length, _ = hidden_states.shape
        last_state = get_layer_cache(self, past_key_values)
        f = self.f_proj(hidden_states).reshape(batch, length, self.num_v_heads, self.head_k_dim)
        ratio = self.shared_key_ratio(f)
        q, k, v, conv_states, normalised = self.qkv_heads(hidden_states, last_state, use_cache, ratio)
        options = dict(initial_state=last_state["recurrent_state"] if last_state is not None else None,
                       output_final_state=bool(use_cache), scale=self.query_scale, state_v_first=self.state_v_first)
        b = self.b_proj(hidden_states)
        if ratio > 1:
            beta = self.write_strength(b, ratio)
            gate = DecayGate(*self.decay_parameters(torch.float32)[:2], self.lower_bound)
            out, final_state = shared_key_kda(q, k, v, f, beta, gate, **options)
        else:
            g, decay_gate = self.decay_inputs(f)
            out, final_state = self.recurrence(
                q, k, v, g, self.write_strength(b), **options, use_qk_l2norm=not normalised,
                **({} if decay_gate is None else dict(decay_gate=decay_gate)),
            )
        out = self.finish(out, hidden_states, past_key_values, final_state, conv_states)
        return out, None, past_key_values


class PrunedKDAForCausalLM(PrunedFlaForCausalLMMixin, KDAForCausalLM):
    """KDAForCausalLM whose layers read their heads from ``config.per_layer_config``; CPU tensors never reach
    Triton."""

    mixer_class = PrunedFlaKDA
    head_fields = FIELDS


KDAPerLayerConfig = register_classes(KDAConfig, PrunedKDAForCausalLM)
