"""Qwen3-Next (``qwen3_next``) with per-layer linear-attention heads. Shipped in output folders (auto_map)."""

import torch
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextForCausalLM, Qwen3NextGatedDeltaNet

from .gated_deltanet import PrunableGatedDeltaNetMixin, global_head_counts, install_mixers
from .stock_dispatch import HubKernelsOffByDefault, StockExpertsDispatch


def grouped_to_flat_order(value_to_key: list[int], key_dim: int, value_dim: int) -> tuple[list[int], list[int]]:
    """Row orders that turn the grouped projections into flat ones.

    ``in_proj_qkvz`` holds, for each key head g with value heads V_g, the rows [q_g | k_g | v_{V_g} | z_{V_g}];
    ``in_proj_ba`` holds [b_{V_g} | a_{V_g}]. Returns the permutations to [q all | k all | v all | z all] and
    [b all | a all].
    """
    q, k, v, z, b, a = [], [], [], [], [], []
    qkvz_row = ba_row = 0
    for group in range(max(value_to_key) + 1):
        size = value_to_key.count(group)
        for part, width in ((q, key_dim), (k, key_dim), (v, size * value_dim), (z, size * value_dim)):
            part.extend(range(qkvz_row, qkvz_row + width))
            qkvz_row += width
        for part in (b, a):
            part.extend(range(ba_row, ba_row + size))
            ba_row += size
    return q + k + v + z, b + a


class PrunedQwen3NextGatedDeltaNet(PrunableGatedDeltaNetMixin, Qwen3NextGatedDeltaNet):
    """Qwen3-Next's mixer: fused projections grouped by key head; groups may hold different numbers of heads."""

    def set_value_to_key(self, value_to_key):
        super().set_value_to_key(value_to_key)
        if self.value_to_key != sorted(self.value_to_key):
            raise ValueError(f"layer {self.layer_idx}: Qwen3-Next value heads must be ordered by key head")
        self._flat_orders = grouped_to_flat_order(self.value_to_key, self.head_k_dim, self.head_v_dim)
        self._order_cache = {}

    def _orders(self, device):
        if device not in self._order_cache:
            with torch.inference_mode(False):  # an inference tensor could not be saved by a later backward pass
                self._order_cache[device] = [torch.tensor(o, dtype=torch.long, device=device)
                                             for o in self._flat_orders]
        return self._order_cache[device]

    def project(self, hidden_states):
        qkvz_order, ba_order = self._orders(hidden_states.device)
        qkvz = self.in_proj_qkvz(hidden_states).index_select(-1, qkvz_order)
        ba = self.in_proj_ba(hidden_states).index_select(-1, ba_order)
        mixed_qkv, z = qkvz.split([2 * self.key_dim + self.value_dim, self.value_dim], dim=-1)
        b, a = ba.split([self.num_v_heads, self.num_v_heads], dim=-1)
        return mixed_qkv, z, b, a


class PrunedQwen3NextForCausalLM(HubKernelsOffByDefault, StockExpertsDispatch, Qwen3NextForCausalLM):
    """Qwen3NextForCausalLM whose linear-attention layers read their heads from ``config.per_layer_config``."""

    def __init__(self, config):
        with global_head_counts(config):
            super().__init__(config)
        install_mixers(self, PrunedQwen3NextGatedDeltaNet)
