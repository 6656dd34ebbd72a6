"""The registry of prunable families, found in this folder, and the refusals for families whose heads cannot be
removed exactly."""

from __future__ import annotations

import importlib
import pkgutil

from ..errors import CompressorError
from .base import Family, HeadLayout, kept_indices
from .fla_support import FLA_IMPORT_ERROR

NOT_FAMILIES = ("base", "fla_support")
"""Modules of this folder that hold no family."""


def discover() -> tuple[Family, ...]:
    """Every ``Family`` at the top level of a module of this folder, once (a new family is one new file), the fla
    ones only when fla can be imported."""
    found = []
    for module in sorted(info.name for info in pkgutil.iter_modules(__path__)):
        if module in NOT_FAMILIES or (module.startswith("fla_") and FLA_IMPORT_ERROR is not None):
            continue
        loaded = importlib.import_module(f"{__name__}.{module}")
        found += [value for value in vars(loaded).values()
                  if isinstance(value, Family) and all(value is not other for other in found)]
    return tuple(found)


FAMILIES: tuple[Family, ...] = discover()

REFUSED = {
    "retnet": "RetNet fixes each head's decay by its index (γ_h = 1 − 2^(−5−h)), so removing a head changes the "
    "decay of every later head",
    "mamba2": "Mamba2's gated RMSNorm normalises over each group of heads sharing B/C, so with fewer groups than "
    "heads removing one head changes the others' outputs (one group per head is not implemented either)",
    "hgrn2": "HGRN2 splits the whole hidden size among its heads (value dimension hidden_size / num_heads), so "
    "fewer heads would resize every remaining head",
    "rwkv7": "RWKV7 has hidden_size / head_dim heads whose projections, LoRAs and group norm span the whole hidden "
    "size, so its stock layer cannot hold fewer heads",
}

__all__ = ["FAMILIES", "Family", "HeadLayout", "family_for", "kept_indices", "supported_model_types"]


def supported_model_types() -> list[str]:
    return sorted(model_type for family in FAMILIES for model_type in family.model_types)


def family_for(config, purpose: str = "prune") -> Family:
    """The family of a transformers config, or a CompressorError naming the supported ones (``purpose``: the verb
    the message uses, ``prune`` or ``evaluate``)."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(supported_model_types())
    if model_type in REFUSED:
        raise CompressorError(f"cannot {purpose} model type '{model_type}': {REFUSED[model_type]} (supported: "
                              f"{supported}).")
    raise CompressorError(f"cannot {purpose} model type '{model_type}'; supported model types: {supported}.")
