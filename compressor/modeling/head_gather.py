"""Key heads copied to the value heads that read them, head-major, in one launch.

Shipped inside output folders of grouped models (imports only torch and, where installed, triton). A pruned layer
may keep any number of value heads under each key head, so its queries and keys are repeated per value head before
the recurrence, which packs every value head as a sequence of its own (``packed_heads.py``). PyTorch does that in
two passes over memory: a copy of the key heads into head-major order, then an ``index_select`` of whole head slabs
(``PrunableGatedDeltaNetMixin.gathered_heads``). ``gather_heads`` launches one Triton kernel for queries and keys
both, which reads each key head where the projection or the convolution left it (token-major for fla's projections,
channel-major for transformers' convolution) and writes every value head's copy, head-major. Neither the head
counts, the batch nor the length is a compile-time constant, one configuration is fixed and nothing autotunes: a
compilation per head size and dtype, and per alignment of the inputs (Triton specialises strides and addresses on
divisibility by 16, so that rows load in vectors), a few in all.

Shapes: one or two groups (queries, keys) of key heads [B, H_k, T, d] (any strides, the same for both), index [H_v]
(int64, the key head of every value head) -> out [G, B, H_v, T, d], contiguous. CPU tensors only under Triton's
interpreter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .fla_decode_step import launching_on, next_power_of_2

try:  # folders of grouped models run where triton is absent too: the caller then gathers in PyTorch
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BLOCK_TOKENS = 32
"""Tokens per program: with 4 warps and d = 128, 32 values per thread."""
NUM_WARPS = 4
MAX_HEAD_DIM = 256
"""The widest heads ``takes`` lets through (a program holds BLOCK_TOKENS x d values)."""


def takes(groups: Sequence[torch.Tensor]) -> bool:
    """Whether ``gather_heads`` copies these one or two groups of key heads [B, H_k, T, d]: on a GPU, outside autograd
    (the kernel has no backward), of one shape, dtype and layout, d ≤ ``MAX_HEAD_DIM``, triton importable."""
    if not groups:
        return False
    first = groups[0]
    return (triton is not None and first.is_cuda and not torch.is_grad_enabled() and first.shape[-1] <= MAX_HEAD_DIM
            and 1 <= len(groups) <= 2 and all(x.shape == first.shape and x.stride() == first.stride()
                                               and x.dtype == first.dtype and x.device == first.device
                                               for x in groups))


def gather_heads(groups: Sequence[torch.Tensor], index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """out[g, b, j] = groups[g][b, index[j]] for one or two groups of key heads [B, H_k, T, d] of one shape, dtype and
    strides (queries and keys) and index [H_v] (contiguous integers in [0, H_k), on their device; the range is not
    checked, which would make the host wait for the GPU): out [G, B, H_v, T, d] (given or made), contiguous, in one
    launch."""
    if not 1 <= len(groups) <= 2:
        raise ValueError(f"gather_heads takes one or two groups of key heads, not {len(groups)}")
    first = groups[0]
    if any(x.shape != first.shape or x.stride() != first.stride()
                                        or x.dtype != first.dtype or x.device != first.device for x in groups):
        raise ValueError("gather_heads takes one or two groups of key heads of one shape, dtype, layout and device")
    if index.dim() != 1 or not index.is_contiguous() or index.device != first.device or index.is_floating_point():
        raise ValueError("gather_heads takes a contiguous integer index [H_v] on the key heads' device")
    batch, _, length, width = first.shape
    heads = index.numel()
    shape = (len(groups), batch, heads, length, width)
    if out is None:
        out = torch.empty(shape, dtype=first.dtype, device=first.device)
    if out.shape != shape or out.dtype != first.dtype or not out.is_contiguous() or out.device != first.device:
        raise ValueError(f"gather_heads writes a contiguous {first.dtype} out {list(shape)} on {first.device}")
    if out.numel():
        chunks = -(-length // BLOCK_TOKENS)
        with launching_on(first):
            head_gather_kernel[(chunks * out.shape[:3].numel(),)](
                first, groups[-1], index, out, length, batch, heads, chunks, *first.stride(), D=width,
                BT=BLOCK_TOKENS, BD=next_power_of_2(width), WHOLE_BLOCKS=length % BLOCK_TOKENS == 0,
                num_warps=NUM_WARPS,
            )
    return out


if triton is not None:

    @triton.jit(do_not_specialize=["T", "B", "HV", "NT"])
    def head_gather_kernel(first, second, index, out, T, B, HV, NT, s_b, s_h, s_t, s_c, D: tl.constexpr,
                           BT: tl.constexpr, BD: tl.constexpr, WHOLE_BLOCKS: tl.constexpr):
        """One program per BT tokens of one (group, sequence, value head): group g's key heads read at b·s_b +
        index[j]·s_h + t·s_t + c·s_c from ``first`` (g = 0) or ``second`` (g = 1), out written at
        (((g·B + b)·HV + j)·T + t)·D + c. ``WHOLE_BLOCKS`` (T a multiple of BT) drops the tokens' mask, so that
        tokens contiguous in memory (a convolution's channel-major output) load in vectors."""
        i_gbj = tl.program_id(0).to(tl.int64) // NT
        i_t = tl.program_id(0).to(tl.int64) % NT
        i_gb, i_j = i_gbj // HV, i_gbj % HV
        i_g, i_b = i_gb // B, i_gb % B
        i_k = tl.load(index + i_j).to(tl.int64)
        o_t = i_t * BT + tl.arange(0, BT)
        o_c = tl.arange(0, BD).to(tl.int64)
        in_tokens = tl.full([BT], 1, tl.int1) if WHOLE_BLOCKS else o_t < T
        mask = in_tokens[:, None] & (o_c < D)[None, :]
        offsets = i_b * s_b + i_k * s_h + o_t[:, None] * s_t + o_c[None, :] * s_c
        if i_g == 0:
            values = tl.load(first + offsets, mask=mask, other=0.0)
        else:
            values = tl.load(second + offsets, mask=mask, other=0.0)
        tl.store(out + (i_gbj * T + o_t[:, None]) * D + o_c[None, :], values, mask=mask)
