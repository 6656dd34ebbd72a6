"""Run an fla kernel with every head packed as a sequence of its own, so that no head or batch count is a
compile-time constant.

Shipped inside output folders (imports only torch and, optionally, fla). fla's Triton kernels take head counts,
and some (the gates' chunked cumulative sum, the delta rule's decode step) the batch size, as compile-time
constants: a model whose layers keep different numbers of heads would compile and autotune those kernels once per
distinct count. The heads of a linear-attention layer never mix inside the recurrence, so a batch of B sequences of
H heads is the same computation as B·H sequences of one head; packed back to back into one batch of
variable-length sequences (fla's ``cu_seqlens``), every layer hands the kernels batch 1 and one head, whatever it
kept. fla's chunked kernels L2-normalise queries and keys with a kernel whose compile-time constants count the
rows (tokens x heads) in steps of 65,536, so the chunked path normalises them here instead, through that kernel
launched with a constant count (``normalised``, ``fla_rows.py``).

Shapes: per-head inputs x [B, T, H, ·] (q, k, v, per-channel gates) or [B, T, H] (per-head gates, beta) are packed
to [1, B·H·T, 1, ·]; states [B, H, K, V] to [B·H, 1, K, V]. Inputs laid out head-major (``x.transpose(1, 2)``
contiguous, as the mixers produce them) pack without a copy. Kernels that take the batch size as an ordinary argument
need no sequence boundaries: ``heads_as_batch`` hands such a kernel B·H one-head batch entries instead (the same
memory), which spares it the varlen bookkeeping: a decode token's step, and the chunked forwards of the (gated)
delta rule and KDA (``fla_chunk``), up to ``MAX_BATCH_ENTRIES``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch

from .fla_rows import l2_normalised, l2norm_kernel, takes

L2_EPS = 1e-6
"""The epsilon of fla's L2 normalisation of queries and keys (``l2norm_fwd``'s default, which its layers take)."""

CHUNK_SIZE = 64
"""The chunk size of fla's chunked kernels as the direct forwards run them (``fla_chunk``), for which
``chunk_indices`` and ``chunk_offsets`` are prepared (fla's public functions derive theirs from ``cu_seqlens_cpu``)."""


MAX_BATCH_ENTRIES = 65_535
"""The most heads (batch x heads) that ``heads_as_batch`` may hand a chunked forward: fla's chunked kernels put the
batch in the second or third dimension of their grids, which CUDA caps at 65,535. More take fla's public function,
every head a packed sequence."""


def normalised(x: torch.Tensor, eps: float = L2_EPS) -> torch.Tensor:
    """x / sqrt(sum x² + eps) over the last dimension, computed in float32 and returned in x's dtype, as fla's l2norm
    kernel computes it. x [B, T, H, ·] -> the same shape. CUDA tensors outside autograd with at most 512 channels take
    fla's kernel in one launch (``fla_rows.l2_normalised``, after a copy of rows that are not contiguous in
    head-major order; PyTorch launches seven and keeps float32 copies in memory) and return head-major
    (``y.transpose(1, 2)`` contiguous); everything else PyTorch, in x's layout."""
    if takes(x) and l2norm_kernel() is not None:
        return normalised_by(l2_normalised, x, eps)
    y = x.float()
    return (y * torch.rsqrt((y * y).sum(dim=-1, keepdim=True) + eps)).to(x.dtype)


def normalised_pair(q: torch.Tensor, k: torch.Tensor, eps: float = L2_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(normalised(q), normalised(k))``; where fla's kernel runs and q and k tile one block of memory row by row (the
    two halves of a mixer's ``queries_and_keys``), in one launch over that block (``normalised_pair_by``)."""
    if takes(q) and takes(k) and l2norm_kernel() is not None:
        return normalised_pair_by(l2_normalised, q, k, eps)
    return normalised(q, eps), normalised(k, eps)


def normalised_by(normalise_rows: Callable, x: torch.Tensor, eps: float = L2_EPS) -> torch.Tensor:
    """``normalised`` through ``normalise_rows`` (rows [N, D], contiguous -> normalised rows [N, D]), called on x's rows
    in head-major order. The rows are made contiguous first: fla's kernel reads row i at i·D from the first element,
    and a one-token slice of a head-major tensor (a rollback's first step, see
    ``decode_graph.RecordedDecodeSteps.recur``) reshapes to rows a whole sequence apart. x [B, T, H, D] -> the same
    shape, head-major."""
    heads_first = x.transpose(1, 2)
    rows = heads_first.reshape(-1, x.shape[-1]).contiguous()
    return normalise_rows(rows, eps).view(heads_first.shape).transpose(1, 2)


def normalised_pair_by(
    normalise_rows: Callable, q: torch.Tensor, k: torch.Tensor, eps: float = L2_EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """``normalised_pair`` through ``normalise_rows`` (as ``normalised_by``): one call over the rows q and k tile
    (``shared_rows``), returned as the views of its output that q and k are of the memory, in their layouts;
    otherwise ``normalised_by`` of each."""
    rows = shared_rows(q, k)
    if rows is None:
        return normalised_by(normalise_rows, q, eps), normalised_by(normalise_rows, k, eps)
    out = normalise_rows(rows, eps)
    start = rows.storage_offset()
    return tuple(out.as_strided(x.shape, x.stride(), x.storage_offset() - start) for x in (q, k))


def shared_rows(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """The block of memory that q and k [..., D] tile, as contiguous rows [N, D] (N·D = q's and k's elements), when
    each of their rows [D] is one of the block's; None otherwise (different memory, gaps, overlaps, rows that
    straddle two of the block's). Read from the layout alone: views made under ``torch.inference_mode`` record no
    base."""
    width = q.shape[-1]
    if (q.dtype != k.dtype or k.shape[-1] != width or not q.numel() or not k.numel()
            or q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()):
        return None
    start = min(q.storage_offset(), k.storage_offset())
    end = max(x.storage_offset() + sum((size - 1) * stride for size, stride in zip(x.shape, x.stride())) + 1
              for x in (q, k))
    if end - start != q.numel() + k.numel():
        return None
    for x in (q, k):
        if x.stride(-1) != 1 or (x.storage_offset() - start) % width or any(s % width for s in x.stride()[:-1]):
            return None
    return q.as_strided(((end - start) // width, width), (width, 1), start)


def head_major(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [B, T, H, ·] or [B, T, H] cast to ``dtype`` (default: x's) in head-major memory, in one copy (none where it
    already is, in that dtype): the same shape, whose ``transpose(1, 2)`` is contiguous. On CUDA, elementwise
    results of it are laid out the same way, so ``pack`` of them is a view, where a per-head gate computed in x's
    layout would be copied again to pack it."""
    heads_first = x.transpose(1, 2)
    if dtype is None or dtype == x.dtype:
        return heads_first.contiguous().transpose(1, 2)
    return heads_first.to(dtype, memory_format=torch.contiguous_format).transpose(1, 2)


def head_major_like(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised tensor of x's shape [B, T, H, ·] or [B, T, H] (dtype: x's unless given) in head-major memory:
    the ``out`` of an elementwise op whose result ``pack`` then takes as a view."""
    batch, length, heads = x.shape[:3]
    empty = torch.empty(batch, heads, length, *x.shape[3:], dtype=dtype or x.dtype, device=x.device)
    return empty.transpose(1, 2)


def sigmoid_head_major(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """sigmoid(x) for x [B, T, H] (or [B, T, H, ·]) in ``dtype`` (by default x's): written head-major
    (``head_major_like``) in one launch, two in another dtype than x's; in x's layout where autograd records it (it
    takes no ``out``)."""
    dtype = dtype or x.dtype
    if torch.is_grad_enabled() and x.requires_grad:
        return x.to(dtype).sigmoid()
    if dtype == x.dtype:
        return torch.sigmoid(x, out=head_major_like(x))
    return head_major_like(x, dtype).copy_(x).sigmoid_()  # sigmoid(x, out=) would round to x's dtype first


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, T, H, ·] or [B, T, H] -> [1, B·H·T, 1, ·] or [1, B·H·T, 1] (sequence b·H + h holds head h of b)."""
    batch, length, heads = x.shape[:3]
    return x.transpose(1, 2).reshape(1, batch * heads * length, 1, *x.shape[3:])


def sequence_index(count: int, length: int, device: torch.device) -> dict[str, torch.Tensor]:
    """fla's descriptions of ``count`` packed sequences of ``length`` tokens: ``cu_seqlens`` [count + 1] (their
    starts, int32 on ``device``), its CPU copy ``cu_seqlens_cpu``, ``chunk_indices`` [count · ⌈length / 64⌉, 2]
    (sequence, chunk within it) and ``chunk_offsets`` [count + 1] (each sequence's first chunk, int64) on
    ``device``, in the dtypes fla derives them in (a kernel compiles once for each dtype of its arguments). Built
    without reading the GPU, and cached, so that the same objects return for every layer of a shape (fla caches what
    it derives from them by identity); separately inside and outside ``torch.inference_mode``, whose tensors
    autograd cannot save."""
    return _sequence_index(count, length, device, torch.is_inference_mode_enabled())


@lru_cache(maxsize=64)
def _sequence_index(count: int, length: int, device: torch.device, inference: bool) -> dict[str, torch.Tensor]:
    starts = torch.arange(count + 1, dtype=torch.int32) * length
    chunks = -(-length // CHUNK_SIZE)
    sequence = torch.arange(count, dtype=torch.int32, device=device).repeat_interleave(chunks)
    chunk = torch.arange(chunks, dtype=torch.int32, device=device).repeat(count)
    return dict(cu_seqlens=starts.to(device), cu_seqlens_cpu=starts, chunk_indices=torch.stack([sequence, chunk], 1),
                chunk_offsets=torch.arange(count + 1, dtype=torch.int64, device=device) * chunks)


def heads_as_sequences(
    kernel: Callable, per_head: dict[str, torch.Tensor], initial_state: torch.Tensor | None = None,
    also: tuple[str, ...] = (), **options
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``kernel(**packed per_head, initial_state=…, cu_seqlens=…, **options)`` with every head a sequence.

    ``per_head`` maps the kernel's argument names to tensors [B, T, H, ·] or [B, T, H] (H: value heads; q and k
    already expanded to one head per value head). ``also`` names the other entries of ``sequence_index`` the kernel
    accepts (``cu_seqlens_cpu``, ``chunk_indices``, ``chunk_offsets``). Returns ``(o [B, T, H, V], final state
    [B, H, K, V] or None)``; o is a head-major view (``o.transpose(1, 2)`` is contiguous).
    """
    batch, length, heads = per_head["v"].shape[:3]
    if initial_state is not None:
        initial_state = initial_state.reshape(batch * heads, 1, *initial_state.shape[2:])
    index = sequence_index(batch * heads, length, per_head["v"].device)
    out, final = kernel(**{name: pack(x) for name, x in per_head.items()}, initial_state=initial_state,
                        cu_seqlens=index["cu_seqlens"], **{name: index[name] for name in also}, **options)
    out = out.view(batch, heads, length, out.shape[-1]).transpose(1, 2)
    return out, None if final is None else final.view(batch, heads, *final.shape[2:])


def heads_as_batch(
    kernel: Callable, per_head: dict[str, torch.Tensor], initial_state: torch.Tensor | None = None, **options
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``kernel(**per_head as [B·H, T, 1, ·] or [B·H, T, 1], initial_state=…, **options)``: every head a batch entry
    with one head, for kernels that do not take the batch size as a compile-time constant (fla's gated delta rule
    and KDA steps, its chunked delta rule and the pieces of its chunked gated delta rule and KDA:
    ``fla_chunk.chunk_delta_rule``, ``chunk_gated_delta_rule``, ``chunk_kda``). Arguments and returns as
    ``heads_as_sequences`` (without ``also``). The reshapes are views of head-major inputs, and of any input for
    T = 1; others are copied into that order."""
    batch, length, heads = per_head["v"].shape[:3]
    if initial_state is not None:
        initial_state = initial_state.reshape(batch * heads, 1, *initial_state.shape[2:])
    out, final = kernel(**{name: x.transpose(1, 2).reshape(batch * heads, length, 1, *x.shape[3:])
                           for name, x in per_head.items()}, initial_state=initial_state, **options)
    out = out.view(batch, heads, length, out.shape[-1]).transpose(1, 2)
    return out, None if final is None else final.view(batch, heads, *final.shape[2:])


def key_heads_as_batch(
    kernel: Callable, queries_keys: dict[str, torch.Tensor], per_value: dict[str, torch.Tensor],
    initial_state: torch.Tensor | None = None, **options
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``heads_as_batch`` for value heads that share key heads, r per key head in the stock grouping (value head j
    reads key head j // r), in fla's layout for them: every key head a batch entry of one query/key head and r value
    heads, so that the kernel reads each key head once where ``heads_as_batch`` hands it a copy per value head (r is
    the kernel's compile-time value-head count; the key heads, batch and length are not compiled in).

    ``queries_keys`` maps argument names to q, k [B, T, H_k, K], handed over as [B·H_k, T, 1, K]; ``per_value`` to
    tensors [B, T, H_k, r, ·] or [B, T, H_k, r] (value head j at [:, :, j // r, j % r]), as [B·H_k, T, r, ·] or
    [B·H_k, T, r]; initial state [B, H_v, K, V]. Inputs whose ``.transpose(1, 2)`` is contiguous (as the mixers
    write them) are handed over without a copy. Returns ``(o [B, T, H_k, r, V], final state [B, H_v, K, V] or
    None)``; o is a view whose ``.transpose(1, 2)`` is contiguous."""
    batch, length, key_heads, ratio = per_value["v"].shape[:4]
    entries = batch * key_heads
    if initial_state is not None:
        initial_state = initial_state.reshape(entries, ratio, *initial_state.shape[2:])
    packed = {name: x.transpose(1, 2).reshape(entries, length, 1, x.shape[-1]) for name, x in queries_keys.items()}
    packed |= {name: x.transpose(1, 2).reshape(entries, length, *x.shape[3:]) for name, x in per_value.items()}
    out, final = kernel(**packed, initial_state=initial_state, **options)
    out = out.view(batch, key_heads, length, ratio, out.shape[-1]).transpose(1, 2)
    return out, None if final is None else final.view(batch, key_heads * ratio, *final.shape[2:])
