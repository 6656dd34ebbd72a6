"""Run an fla kernel with every head as a sequence of its own, so that head counts are not compile-time constants.

Shipped inside output folders (imports only torch). fla's Triton kernels take the head counts as compile-time
constants: a model whose layers keep different numbers of heads would compile (and autotune) one kernel per
distinct count. The heads of a linear-attention layer never mix inside the recurrence, so a batch of B sequences
of H heads is the same computation as B·H sequences of one head; the kernels then see H = 1 in every layer (Triton
still specialises integer arguments such as B·H on divisibility by 16, so a model may compile a kernel twice).

Shapes: per-head inputs x [B, T, H, ·] (q, k, v, per-channel gates) or [B, T, H] (per-head gates, beta) are folded
to [B·H, T, 1, ·]; states [B, H, K, V] to [B·H, 1, K, V]. Inputs laid out head-major (``x.transpose(1, 2)``
contiguous, as the mixers produce them) fold without a copy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def fold(x: torch.Tensor) -> torch.Tensor:
    """[B, T, H, ·] or [B, T, H] -> [B·H, T, 1, ·] or [B·H, T, 1]."""
    batch, length, heads = x.shape[:3]
    return x.transpose(1, 2).reshape(batch * heads, length, 1, *x.shape[3:])


def heads_as_batch(
    kernel: Callable, per_head: dict[str, torch.Tensor], initial_state: torch.Tensor | None = None, **options
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``kernel(**folded per_head, initial_state=…, **options)`` with heads folded into the batch.

    ``per_head`` maps the kernel's argument names to tensors [B, T, H, ·] or [B, T, H] (H: value heads; q and k
    already expanded to one head per value head). Returns ``(o [B, T, H, V], final state [B, H, K, V] or None)``;
    o is a head-major view (``o.transpose(1, 2)`` is contiguous).
    """
    batch, length, heads = per_head["v"].shape[:3]
    if initial_state is not None:
        initial_state = initial_state.reshape(batch * heads, 1, *initial_state.shape[2:])
    out, final = kernel(**{name: fold(x) for name, x in per_head.items()}, initial_state=initial_state, **options)
    out = out.view(batch, heads, length, out.shape[-1]).transpose(1, 2)
    return out, None if final is None else final.view(batch, heads, *final.shape[2:])
