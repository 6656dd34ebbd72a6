"""Families described as data: which parameter carries which head on which axis, and how to rebuild a layer.

A parameter axis is a sequence of segments. ``Flat`` lists every head of a kind one after another
(``[q_0 … q_n | k_0 … k_n | v_0 … v_m]``); ``Grouped`` repeats its blocks once per key head, the value blocks
holding only that key head's value heads (Qwen3-Next's ``[q_g | k_g | v_{V_g} | z_{V_g}]``). One generic
function (``kept_indices``) turns a layout and a set of kept value heads into the indices to keep.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from torch import nn

from ..modeling.gated_deltanet import FIELDS as GATED_DELTANET_FIELDS

KEY, VALUE = "key", "value"


@dataclass(frozen=True)
class Block:
    """``width`` rows per head of ``kind``: ``"key_dim"``, ``"value_dim"`` or ``1``."""

    kind: Literal["key", "value"]
    width: str | int


K = Block(KEY, "key_dim")
"""The rows of one key head (a query or key projection's, a query/key convolution's)."""
V = Block(VALUE, "value_dim")
"""The rows of one value head."""
ONE = Block(VALUE, 1)
"""One entry per value head (a decay, a write strength, a gate)."""
VALUE_K = Block(VALUE, "key_dim")
"""``d_k`` entries per value head (a per-channel decay)."""


@dataclass(frozen=True)
class Flat:
    blocks: tuple[Block, ...]


@dataclass(frozen=True)
class Grouped:
    blocks: tuple[Block, ...]


@dataclass(frozen=True)
class TensorLayout:
    """Where the heads of one parameter lie: along ``axis``, in these ``segments``."""

    axis: int
    segments: tuple[Flat | Grouped, ...]


def rows(*segments: Flat | Grouped) -> TensorLayout:
    return TensorLayout(0, segments)


def columns(*segments: Flat | Grouped) -> TensorLayout:
    return TensorLayout(1, segments)


@dataclass(frozen=True)
class HeadLayout:
    """The heads of one linear-attention layer. ``value_to_key[j]`` is the key head that value head j reads."""

    num_key_heads: int
    num_value_heads: int
    key_dim: int
    value_dim: int
    value_to_key: tuple[int, ...]

    def width(self, block: Block) -> int:
        return block.width if isinstance(block.width, int) else getattr(self, block.width)


@runtime_checkable
class Mixer(Protocol):
    """What every family's linear-attention mixer offers compressor (``Family.mixer_class``).

    Head counts and sizes describe the mixer as built; value head j reads key head ``value_to_key[j]``.
    ``recurrence`` is the shipped dispatcher the forward pass calls, (q, k, v, ..., initial_state,
    output_final_state) -> (o [B, T, H_v, d_v], final state [B, H_v, d_k, d_v] or None); calibration replaces it on
    an instance to read the chunk states (``compressor.state_capture``). ``adopt(module, value_to_key)`` makes a
    stock module of the family's architecture one of these, in place, with that head map (None: the stock one).
    """

    layer_idx: int
    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    value_to_key: list[int]
    out_proj: nn.Linear
    recurrence: Callable

    @classmethod
    def adopt(cls, module: nn.Module, value_to_key: list[int] | None = None) -> nn.Module: ...


@dataclass(frozen=True)
class ConfigFields:
    """Names of the config attributes that hold a layer's head layout: the ``FIELDS`` of the family's modeling
    file, which reads them too."""

    num_key_heads: str
    num_value_heads: str
    key_dim: str
    value_dim: str
    value_to_key: str


@dataclass(frozen=True)
class Family:
    """A prunable model family.

    ``tensors`` maps each per-head parameter of the mixer (relative name) to its layout; ``shared`` lists the
    mixer's parameters that no head owns. A parameter in neither is an error, so nothing is left unsliced.
    """

    name: str
    model_types: tuple[str, ...]
    mixer_attr: str
    tensors: dict[str, TensorLayout]
    shared: tuple[str, ...]
    modeling_file: str
    model_class: type
    mixer_class: type
    fields: ConfigFields = field(default_factory=lambda: ConfigFields(**GATED_DELTANET_FIELDS))
    """Default: the fields of transformers' Gated DeltaNet families (Qwen3.5, Qwen3-Next, OLMo-Hybrid)."""
    config_class: type | None = None
    """Set when transformers does not know the model type by itself (fla) or its stock config cannot hold per-layer
    heads (Kimi Linear): auto_map then names it as AutoConfig."""
    per_layer_config_class: type | None = None
    """Set when the stock model type would load per-layer folders into classes that cannot read per-layer heads
    (fla's, once fla is imported): such folders are written with this config class and its own model type."""
    layer_fields: Callable[[object, HeadLayout], dict] | None = None
    """(source config, a layer's pruned layout) -> further config fields that layout implies (fla's GLA and DeltaNet
    size their heads through expand_k/expand_v)."""
    linear_layer_type: str | None = None
    """When set, only layers whose ``config.layer_types[i]`` equals it hold a prunable mixer at ``mixer_attr``
    (Kimi Linear names both its MLA and its KDA mixers ``self_attn``)."""


def kept_indices(layout: TensorLayout, heads: HeadLayout, kept_values: list[int]) -> tuple[list[int], int]:
    """(indices along ``layout.axis`` that belong to the kept value heads and the key heads they read,
    the axis length the layout describes)."""
    kept_keys = {heads.value_to_key[j] for j in kept_values}
    kept_value_set = set(kept_values)
    indices: list[int] = []
    offset = 0

    def take(first_head_row: int, width: int) -> None:
        indices.extend(range(first_head_row, first_head_row + width))

    for segment in layout.segments:
        if isinstance(segment, Flat):
            for block in segment.blocks:
                width = heads.width(block)
                count = heads.num_key_heads if block.kind == KEY else heads.num_value_heads
                kept = kept_keys if block.kind == KEY else kept_value_set
                for head in range(count):
                    if head in kept:
                        take(offset + head * width, width)
                offset += count * width
        else:
            for key in range(heads.num_key_heads):
                members = [j for j, k in enumerate(heads.value_to_key) if k == key]
                for block in segment.blocks:
                    width = heads.width(block)
                    slots = [key in kept_keys] if block.kind == KEY else [j in kept_value_set for j in members]
                    for slot, kept in enumerate(slots):
                        if kept:
                            take(offset + slot * width, width)
                    offset += len(slots) * width
    return indices, offset
