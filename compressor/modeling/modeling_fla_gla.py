"""fla's Gated Linear Attention (``gla``) with per-layer heads and CPU tensors routed to PyTorch.

Shipped in output folders (auto_map). GLA sizes its heads through ``expand_k``/``expand_v`` (key width
hidden_size · expand_k, split into ``num_heads`` heads), so a layer with fewer heads gets ``num_heads``,
``expand_k`` and ``expand_v`` (and ``num_kv_heads`` when the source sets it) in ``config.per_layer_config[i]``.
Every head has its own keys, values and key-channel decay; the low-rank gate's first factor is shared.

Importing this file registers its model class for fla's config and for the per-layer config below (auto_map's
AutoConfig imports it first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fla.layers.gla import GatedLinearAttention
from fla.layers.utils import get_layer_cache, update_layer_cache
from fla.models.gla import GLAConfig, GLAForCausalLM

from .fla_layers import (
    FlaMixerMixin,
    PrunedFlaForCausalLMMixin,
    activation,
    register_classes,
    route_to_torch,
)
from .fla_chunk import direct, gla_forward
from .gated_deltanet import global_head_counts
from .gla import gla, token_major_gla
from .packed_heads import head_major, head_major_like

FIELDS = {"num_key_heads": "num_heads", "num_value_heads": "num_heads", "key_dim": "head_dim", "value_dim": "head_dim",
          "value_to_key": "value_to_key_head", "query_scale": "query_scale"}


class PrunedFlaGLA(FlaMixerMixin, GatedLinearAttention):
    """fla's GatedLinearAttention layer built from a (per-layer) config; ``out_proj`` names fla's ``o_proj``."""

    recurrence = staticmethod(gla)
    normalises_convolved_keys = False  # GLA's recurrence normalises neither queries nor keys

    def __init__(self, config, layer_idx: int):
        super().__init__(
            mode=config.attn_mode, hidden_size=config.hidden_size, expand_k=config.expand_k,
            expand_v=config.expand_v, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
            feature_map=config.feature_map, use_short_conv=config.use_short_conv, conv_size=config.conv_size,
            use_output_gate=config.use_output_gate, gate_fn=config.hidden_act,
            elementwise_affine=config.elementwise_affine, norm_eps=config.norm_eps, clamp_min=config.clamp_min,
            fuse_norm=config.fuse_norm, layer_idx=layer_idx,
        )
        route_to_torch(self)

    @property
    def num_v_heads(self) -> int:
        return self.num_heads

    token_major_heads: int | None = None
    """The head count whose prefill on a GPU runs in fla's own token-major layout (``token_major_gla``): the config's
    global count, which the model class sets (``PrunedGLAForCausalLM.refresh_layouts``; None: none). Layers of any
    other count pack their heads as sequences (``packed_heads``), so that one model compiles fla's kernels for at most
    two head counts."""

    def key_decay(self, gk: torch.Tensor, token_major: bool = False) -> torch.Tensor:
        """The log decay of every key channel, logsigmoid(gk) / gate_logit_normalizer (clamped below at clamp_min)
        [B, T, H, d_k], from gk [B, T, H, d_k], in gk's dtype as fla's layer computes it (fla's chunked forward sums it
        in float32), written head-major by the division (on CUDA it packs as a view; in gk's layout where
        ``token_major``)."""
        if torch.is_grad_enabled():
            decay = head_major(F.logsigmoid(gk)) / self.gate_logit_normalizer
        else:
            out = torch.empty_like(gk) if token_major else head_major_like(gk)
            decay = torch.div(F.logsigmoid(gk), self.gate_logit_normalizer, out=out)
        return decay if self.clamp_min is None else decay.clamp_min(self.clamp_min)

    def runs_token_major(self, hidden_states: torch.Tensor) -> bool:
        """Whether this prefill of hidden [B, T, D] runs in fla's token-major layout (``token_major_gla``): a layer of
        ``token_major_heads`` heads without short convolutions (whose kernels write the heads head-major already),
        more than one token, fla's direct chunked forward (``fla_chunk.direct``), neither ``heads`` nor
        ``recurrence`` replaced on the instance (masks and calibration captures see the packed layout)."""
        return (self.num_heads == self.token_major_heads and not self.use_short_conv and hidden_states.shape[1] > 1
                and "heads" not in vars(self) and "recurrence" not in vars(self)
                and direct(hidden_states, gla_forward))

    def unconvolved(self, q, k, v):
        """Without short convolutions the projections go on as they are (the feature map comes after ``heads``)."""
        return q, k, v

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False, **kwargs):
        """hidden [B, T, D] -> (out [B, T, D], None, cache)."""
        hidden_states = self.unpadded(hidden_states, attention_mask)
        batch, length, _ = hidden_states.shape
        last_state = get_layer_cache(self, past_key_values)
        token_major = self.runs_token_major(hidden_states)
        if token_major:
            q, k, v = (projection(hidden_states).view(batch, length, self.num_heads, -1)
                       for projection in (self.q_proj, self.k_proj, self.v_proj))
            conv_states = None
        else:
            q, k, v, conv_states, _ = self.qkv_heads(hidden_states, last_state, use_cache)
        gk = self.key_decay(self.gk_proj(hidden_states).reshape(batch, length, self.num_heads, self.head_k_dim),
                            token_major)
        if self.feature_map_fn is not None:
            q, k = (activation(self.feature_map_fn, x) for x in (q, k))
        out, final_state = (token_major_gla if token_major else self.recurrence)(
            q, k, v, gk,
            initial_state=last_state["recurrent_state"] if last_state is not None else None,
            output_final_state=bool(use_cache), scale=self.query_scale,
        )
        update_layer_cache(self, past_key_values, recurrent_state=final_state, conv_state=conv_states, offset=length)
        if self.use_output_gate and self.fuse_norm_and_gate:
            gate = self.g_proj(hidden_states).reshape(batch, length, self.num_heads, self.head_v_dim)
            out = self.g_norm_swish_gate(out, gate).reshape(batch, length, -1)
        else:
            out = self.g_norm(out).reshape(batch, length, -1)
            if self.use_output_gate:
                out = out * activation(self.gate_fn, self.g_proj(hidden_states))
        return self.o_proj(out), None, past_key_values


class PrunedGLAForCausalLM(PrunedFlaForCausalLMMixin, GLAForCausalLM):
    """GLAForCausalLM whose layers read their heads from ``config.per_layer_config``; CPU tensors never reach
    Triton."""

    mixer_class = PrunedFlaGLA
    head_fields = FIELDS

    def __init__(self, config):
        super().__init__(config)
        self.refresh_layouts()

    def refresh_layouts(self) -> None:
        """Give every layer the config's global head count as its ``token_major_heads`` (at build, and after
        ``compressor.slicing.slim`` replaced the layers and the config)."""
        with global_head_counts(self.config):
            heads = self.config.num_heads
        for layer in self.model.layers:
            layer.attn.token_major_heads = heads


GLAPerLayerConfig = register_classes(GLAConfig, PrunedGLAForCausalLM)
