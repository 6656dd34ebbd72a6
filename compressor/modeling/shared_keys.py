"""fla's layout for value heads that share a key head, as the project's kernels write it.

Shipped inside output folders (imports only torch and, where installed, triton). The r value heads that read one key
head lie per key head, the r heads interleaved token by token: [B, H_k, T, r, ·] (``.transpose(1, 2)`` of a
[B, T, H_k, r, ·] view), the layout in which fla's chunked kernels read one query/key head and r value heads per
sequence. At r = 1 it is head-major, [B, H, T, ·]. ``short_conv``, ``head_gate`` and ``channel_gate`` write either
through ``interleaved_row``; r is an ordinary argument of their kernels, not a compile-time constant.
"""

from __future__ import annotations

try:  # the kernels that use it run on triton; without it nothing calls interleaved_row
    import triton
    import triton.language as tl  # noqa: F401 (Triton requires it among a jitted function's globals)
except ImportError:
    triton = None


def checked_ratio(heads: int, values_per_key: int, what: str) -> int:
    """``values_per_key`` (r) where it divides ``heads``; otherwise a ValueError naming ``what``."""
    if values_per_key < 1 or heads % values_per_key:
        raise ValueError(f"{what} takes values_per_key dividing the {heads} heads, not {values_per_key}")
    return values_per_key


def interleaved_shape(heads: int, length: int, values_per_key: int) -> tuple[int, ...]:
    """The dimensions after the batch of a [B, H, T, ·] tensor laid out for r = ``values_per_key``: (H, T) for r = 1,
    else (H / r, T, r)."""
    if values_per_key == 1:
        return heads, length
    return heads // values_per_key, length, values_per_key


if triton is not None:

    @triton.jit
    def interleaved_row(i, t, T, R):
        """The row of token t (of T) of head i, counted over batch entries and heads (i = b·H + h), R heads per key
        head: (i // R · T + t)·R + i % R; b·H·T + h·T + t (head-major) for R = 1. In int64 whatever i's type (an
        int32 i divides faster)."""
        return ((i // R).to(tl.int64) * T + t) * R + i % R
