"""Kimi Linear (``kimi_linear``) with per-layer KDA heads. Shipped in output folders (auto_map).

Kimi Linear mixes MLA attention layers and KDA (Kimi Delta Attention) layers, both at ``self_attn``; only the
KDA layers (``config.layer_types[i] == "linear_attention"``) have heads that this code resizes, each from
``config.per_layer_config[i].linear_num_heads``. KDA has one key head per value head (d_k = d_v = head_dim),
a per-channel decay (``forget_gate``: low-rank ``f_a_proj`` → ``f_b_proj``, ``dt_bias`` per head × channel,
``A_log`` per head) and a low-rank output gate (``g_a_proj`` → ``g_b_proj``). Decode steps on CUDA replay a recorded
CUDA graph of themselves where they can (``decode_graph.py``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.kimi_linear.configuration_kimi_linear import KimiLinearConfig
from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearDeltaAttention, KimiLinearForCausalLM

from . import kda
from .channel_gate import channel_gate
from .channel_gate import runs as channel_gate_runs
from .decode_graph import DecodeGraph, RecordedDecodeSteps
from .fla_decode_step import can_step_kda_in_place
from .gated_deltanet import causal_conv1d, causal_conv1d_step, global_head_counts, install_mixers
from .head_norm import rms_normalised
from .head_norm import takes as head_norm_takes
from .kda import kimi_delta_attention
from .packed_heads import sigmoid_head_major
from .stock_dispatch import HubKernelsOffByDefault, StockExpertsDispatch

LINEAR_LAYER = "linear_attention"


class PrunedKimiLinearConfig(KimiLinearConfig):
    """KimiLinearConfig that applies ``per_layer_config`` after its own post-init.

    The stock post-init reads ``linear_num_heads`` globally after the base class has applied the per-layer
    overrides, so a config with per-layer KDA heads could not be built at all; here the overrides come last.
    """

    def __post_init__(self, **kwargs):
        per_layer_config = kwargs.pop("per_layer_config", None)
        super().__post_init__(**kwargs)
        if per_layer_config is not None:
            self.per_layer_config = per_layer_config


class PrunedKimiDeltaAttention(RecordedDecodeSteps, KimiLinearDeltaAttention):
    """KimiLinearDeltaAttention whose CPU tensors use the PyTorch KDA recurrence (``recurrence``) and whose decode
    steps on CUDA replay a recorded CUDA graph of themselves where they can (``decode_graph.py``)."""

    recurrence = staticmethod(kimi_delta_attention)

    @classmethod
    def adopt(cls, module: nn.Module, value_to_key: list[int] | None = None) -> nn.Module:
        """Turn a stock KDA mixer into this class in place (same parameters, new forward)."""
        if value_to_key is not None and list(value_to_key) != list(range(module.num_heads)):
            raise ValueError(f"layer {module.layer_idx}: KDA reads key head j for value head j, not {value_to_key}")
        module.__class__ = cls
        module._decode_graph = DecodeGraph()
        return module

    # The pruning contract's names: one key head per value head, d_k = d_v.
    @property
    def num_k_heads(self) -> int:
        return self.num_heads

    @property
    def num_v_heads(self) -> int:
        return self.num_heads

    @property
    def head_k_dim(self) -> int:
        return self.head_dim

    @property
    def head_v_dim(self) -> int:
        return self.head_dim

    @property
    def value_to_key(self) -> list[int]:
        return list(range(self.num_heads))

    @property
    def out_proj(self) -> nn.Linear:
        """The output projection [hidden, H·d]; its input columns are contiguous per head."""
        return self.o_proj

    def steps_in_place(self, recurrent_state: torch.Tensor | None) -> bool:
        """Whether fla's KDA decode step writes the new state over ``recurrent_state`` (``fla_decode_step.py``)."""
        return kda.HAS_FLA and can_step_kda_in_place(recurrent_state)

    def mix(
        self, hidden_states: torch.Tensor, conv_state: torch.Tensor | None = None,
        recurrent_state: torch.Tensor | None = None, cache=None, stepping: bool = False,
    ) -> torch.Tensor:
        """hidden [B, T, D] -> [B, T, D] from the cache's states (None: none yet). ``stepping``: one token after a
        cached conv_state [B, 3·H·d, W], which is updated in place, as recurrent_state [B, H, d, d] float32 is
        where ``kimi_delta_attention`` can; otherwise ``cache`` (if any) receives the new states."""
        batch, length, _ = hidden_states.shape
        mixed_qkv = torch.cat(
            [self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)], dim=-1
        ).transpose(1, 2)
        weight = self.conv1d.weight.squeeze(1)
        if stepping:
            mixed_qkv = causal_conv1d_step(mixed_qkv, conv_state, weight, self.conv1d.bias, self.activation)
        else:
            if cache is not None:
                mixed_qkv = cache.update_conv_state(
                    mixed_qkv, self.layer_idx, conv_kernel_size=self.conv_kernel_size
                )
            mixed_qkv = causal_conv1d(mixed_qkv, weight, self.conv1d.bias, self.activation)[..., -length:]
        shape = (batch, length, self.num_heads, self.head_dim)
        query, key, value = (x.reshape(shape) for x in mixed_qkv.transpose(1, 2).split(self.qkv_dim, dim=-1))

        g = self.channel_decay(hidden_states)  # [B, T, H, d_k] log decay per channel, float32
        beta = sigmoid_head_major(self.b_proj(hidden_states))
        out, final_state = self.recur(query, key, value, g, beta, recurrent_state, cache)  # states: float32, or float64
        if cache is not None:
            cache.update_recurrent_state(final_state, self.layer_idx)

        gate = self.g_b_proj(self.g_a_proj(hidden_states)).reshape(shape)
        return self.o_proj(self.output_norm(out, gate).reshape(batch, length, -1))

    def channel_decay(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The stock forget gate's log decay -exp(A_log) · softplus(f + dt_bias) [B, T, H, d] float32, f the low-rank
        projection of hidden [B, T, D]: on a GPU outside autograd, unless accelerate hooks the gate, in one launch of
        ``channel_gate``, which writes it head-major (the recurrence reads it without a copy) and whose softplus is
        log1p's (equal up to float32 rounding; the stock module's log(1 + exp(x)) rounds tiny values to 0), where the
        stock module launches about ten kernels over float32 temporaries of that size; otherwise the stock module."""
        gate = self.forget_gate
        if not channel_gate_runs(hidden_states, gate.head_dim) or hasattr(gate, "_hf_hook"):
            return gate(hidden_states)
        f = gate.f_b_proj(gate.f_a_proj(hidden_states)).view(*hidden_states.shape[:2], gate.num_heads, gate.head_dim)
        bias = gate.dt_bias.float().view(gate.num_heads, gate.head_dim)
        return channel_gate(f, bias, gate.A_log.float().exp().view(gate.num_heads), None)

    def output_norm(self, out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """The stock gated norm (``o_norm``: in float32 until the end, times sigmoid(gate)) of out, gate [B, T, H, d]
        -> [B, T, H, d]: the recurrence's head-major output on CUDA outside autograd in one launch of
        ``head_norm.rms_normalised``, which computes the same formula where the rows lie (the stock module launches
        a kernel per operation and reads token-ordered rows); anything else through the stock module."""
        if self.o_norm.activation == "sigmoid" and head_norm_takes(out, gate):
            return rms_normalised(out, self.o_norm.weight, self.o_norm.variance_epsilon, gate, "sigmoid")
        return self.o_norm(out, gate)


FIELDS = {"num_key_heads": "linear_num_heads", "num_value_heads": "linear_num_heads", "key_dim": "linear_head_dim",
          "value_dim": "linear_head_dim", "value_to_key": "linear_value_to_key_head", "query_scale": "linear_query_scale"}
"""The config fields of a KDA layer's heads: one key head per value head, d_k = d_v."""


class PrunedKimiLinearForCausalLM(HubKernelsOffByDefault, StockExpertsDispatch, KimiLinearForCausalLM):
    """KimiLinearForCausalLM whose KDA layers read their head counts from ``config.per_layer_config``."""

    config_class = PrunedKimiLinearConfig

    def __init__(self, config):
        with global_head_counts(config):
            super().__init__(config)
        install_mixers(self, PrunedKimiDeltaAttention, FIELDS, mixer_attr="self_attn", linear_layer_type=LINEAR_LAYER)
