"""A model's linear-attention layers: where they are, the heads they hold, and a plan of heads (and query/key
channels) to keep."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:  # the families import every family's modeling code (and fla): not needed to check options
    from .families import Family, HeadLayout


@dataclass
class PruningPlan:
    """Value heads to keep in each linear-attention layer, in the source model's numbering (sorted)."""

    kept: dict[int, list[int]]
    removed_by_rule: list[tuple[int, int]] = field(default_factory=list)
    """(layer, head) in the order the scoring rule removed them."""
    channels: dict[int, dict[int, list[int]]] = field(default_factory=dict)
    """Layer -> kept key head (source numbering) -> its kept query/key channels (sorted, the same count in every key
    head of the model); empty: every channel is kept."""

    def key_dim(self, layer: int, source_key_dim: int) -> int:
        """The key head size of ``layer`` after this plan."""
        heads = self.channels.get(layer)
        return len(next(iter(heads.values()))) if heads else source_key_dim


def linear_layers(model: nn.Module, family: Family) -> dict[int, nn.Module]:
    """Layer index -> linear-attention mixer, for every layer that has one."""
    return {
        index: getattr(layer, family.mixer_attr)
        for index, layer in enumerate(model.model.layers)
        if hasattr(layer, family.mixer_attr)
        and (family.linear_layer_type is None or model.config.layer_types[index] == family.linear_layer_type)
    }


def head_layout(mixer: nn.Module) -> HeadLayout:
    from .families import HeadLayout

    return HeadLayout(
        num_key_heads=mixer.num_k_heads,
        num_value_heads=mixer.num_v_heads,
        key_dim=mixer.head_k_dim,
        value_dim=mixer.head_v_dim,
        value_to_key=tuple(mixer.value_to_key),
    )


def pruned_layout(source: HeadLayout, kept_values: list[int], key_dim: int | None = None) -> HeadLayout:
    """The layout after keeping ``kept_values`` (and ``key_dim`` channels per key head, None: all): key heads
    survive when one of their value heads does."""
    from .families import HeadLayout

    kept_keys = sorted({source.value_to_key[j] for j in kept_values})
    return HeadLayout(
        num_key_heads=len(kept_keys),
        num_value_heads=len(kept_values),
        key_dim=source.key_dim if key_dim is None else key_dim,
        value_dim=source.value_dim,
        value_to_key=tuple(kept_keys.index(source.value_to_key[j]) for j in kept_values),
    )


def explicit_value_to_key(layout: HeadLayout) -> list[int] | None:
    """The head map to write in the config, or None when the stock grouping (j // r) describes it."""
    from .modeling.gated_deltanet import canonical_value_to_key

    canonical = canonical_value_to_key(layout.num_value_heads, layout.num_key_heads)
    even = layout.num_value_heads % layout.num_key_heads == 0
    return None if even and list(layout.value_to_key) == canonical else list(layout.value_to_key)
