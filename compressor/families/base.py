"""Families described as data: which parameter carries which head on which axis, and how to rebuild a layer.

A parameter axis is a sequence of segments. ``Flat`` lists every head of a kind one after another
(``[q_0 … q_n | k_0 … k_n | v_0 … v_m]``); ``Grouped`` repeats its blocks once per key head, the value blocks
holding only that key head's value heads (Qwen3-Next's ``[q_g | k_g | v_{V_g} | z_{V_g}]``). One generic
function (``kept_indices``) turns a layout, a set of kept value heads and, optionally, the kept query/key channels
of each key head into the indices to keep.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
    output_final_state) -> (o [B, T, H_v, d_v], final state [B, H_v, d_k, d_v] or None; fla's KDA mixer, whose
    ``state_v_first`` is True, keeps and passes them value-first, [B, H_v, d_v, d_k], as fla's own layer does);
    calibration replaces it on an instance to read the chunk states (``compressor.state_capture``).
    ``adopt(module, value_to_key)`` makes a stock module of the family's architecture one of these, in place, with
    that head map (None: the stock one).
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
    query_scale: str
    """The query scale of a layer whose query/key channels were removed (absent: the kernels' d_k^-0.5)."""


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
    query_key: tuple[str, ...] = ("q_proj.weight", "k_proj.weight")
    """The parameters whose key-head rows project the queries and keys (the ``l1`` and ``wanda`` channel scores)."""
    key_channels_refused: str | None = None
    """Why query/key channels cannot be removed exactly from this family (None: they can)."""


@dataclass(frozen=True)
class Span:
    """``width`` consecutive entries from ``start`` along a layout's axis, of one block of key head ``key`` (and
    value head ``value``, for value blocks)."""

    block: Block
    start: int
    width: int
    key: int
    value: int | None


def spans(layout: TensorLayout, heads: HeadLayout) -> Iterator[Span]:
    """Every block of ``layout``, in order along its axis."""
    offset = 0
    for segment in layout.segments:
        if isinstance(segment, Flat):
            for block in segment.blocks:
                width = heads.width(block)
                count = heads.num_key_heads if block.kind == KEY else heads.num_value_heads
                for head in range(count):
                    key, value = (head, None) if block.kind == KEY else (heads.value_to_key[head], head)
                    yield Span(block, offset + head * width, width, key, value)
                offset += count * width
        else:
            for key in range(heads.num_key_heads):
                members = [j for j, k in enumerate(heads.value_to_key) if k == key]
                for block in segment.blocks:
                    width = heads.width(block)
                    for value in [None] if block.kind == KEY else members:
                        yield Span(block, offset, width, key, value)
                        offset += width


def runs_over_key_channels(block: Block) -> bool:
    """Whether a block's entries are a key head's d_k channels (query/key rows, their convolution, a decay over
    d_k), so that removing channels slices it."""
    return block.width == "key_dim"


def kept_indices(layout: TensorLayout, heads: HeadLayout, kept_values: list[int],
                 channels: dict[int, list[int]] | None = None) -> tuple[list[int], int]:
    """(indices along ``layout.axis`` that belong to the kept value heads and the key heads they read,
    the axis length the layout describes). ``channels`` (key head -> kept channels, sorted) restricts the blocks
    that run over d_k to those channels of their key head; None keeps every channel."""
    kept_keys = {heads.value_to_key[j] for j in kept_values}
    kept_value_set = set(kept_values)
    indices: list[int] = []
    size = 0
    for span in spans(layout, heads):
        size = span.start + span.width
        if span.key not in kept_keys or (span.value is not None and span.value not in kept_value_set):
            continue
        if channels is not None and runs_over_key_channels(span.block):
            indices.extend(span.start + c for c in channels[span.key])
        else:
            indices.extend(range(span.start, span.start + span.width))
    return indices, size


def key_channel_rows(layout: TensorLayout, heads: HeadLayout) -> dict[int, list[list[int]]]:
    """Key head -> for each of its key blocks in ``layout`` (a query block, a key block …), the d_k indices of its
    channels along ``layout.axis``."""
    rows: dict[int, list[list[int]]] = {key: [] for key in range(heads.num_key_heads)}
    for span in spans(layout, heads):
        if span.block.kind == KEY and runs_over_key_channels(span.block):
            rows[span.key].append(list(range(span.start, span.start + span.width)))
    return rows
