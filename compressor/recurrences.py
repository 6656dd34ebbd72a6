"""Which implementation the recurrences of ``compressor.modeling`` take for CUDA tensors."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

RECURRENCE_MODULES = ("gated_delta", "delta_rule", "gla", "kda")
"""Modules of ``compressor.modeling`` whose recurrences dispatch CUDA tensors to fla when ``HAS_FLA``."""


@contextlib.contextmanager
def torch_recurrences() -> Iterator[None]:
    """Within the block, CUDA tensors take the PyTorch chunked recurrences of ``compressor.modeling`` instead of
    fla's kernels (their ``HAS_FLA`` flag is cleared and restored after): fla 0.6's backward kernels fail on Hopper
    with triton 3.6, and the PyTorch forms are differentiable. Only models built from ``compressor.modeling`` (as
    ``load_model`` loads them) are affected; a model loaded through a folder's shipped code reads its own copy."""
    saved = {}
    for name in RECURRENCE_MODULES:
        module = importlib.import_module(f"compressor.modeling.{name}")
        if hasattr(module, "HAS_FLA"):
            saved[module] = module.HAS_FLA
            module.HAS_FLA = False
    try:
        yield
    finally:
        for module, value in saved.items():
            module.HAS_FLA = value
