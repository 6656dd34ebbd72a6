"""Gated linear attention recurrences (GLA): a PyTorch reference for CPU tensors, fla's Triton kernels for CUDA.

Shipped inside output folders of fla GLA models (imports only torch and, optionally, fla).
S_t = diag(exp(gk_t)) S_{t-1} + k_t v_t^T,  o_t = S_t^T q_t · scale  (gk_t <= 0: a log decay per key channel).
The PyTorch forms compute in working precision: float32, or float64 for float64 inputs.

Shapes: q, k, gk [B, T, H, K]; v [B, T, H, V]; states [B, H, K, V].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # fla is optional: without it, CUDA tensors use the PyTorch reference too.
    from fla.ops.gla import chunk_gla as _fla_chunk
    from fla.ops.gla import fused_recurrent_gla as _fla_recurrent

    HAS_FLA = True
except Exception:  # ImportError, or fla without triton
    HAS_FLA = False

from .fla_chunk import chunk_gla as unwrapped_chunk
from .fla_chunk import direct, gla_forward
from .packed_heads import heads_as_sequences, sequence_index


def chunk_gla_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    return_chunk_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Chunked GLA in working precision, one sequential step per chunk; within a chunk every decay factor is
    exp(G_i - G_j) with j <= i (G the in-chunk cumulative log decay), so nothing overflows.

    Returns ``(o [B, T, H, V] in v's dtype, final state [B, H, K, V] in working precision or None,
    chunk states [B, H, N, K, V] in working precision or None)``, N = ceil(T / chunk_size), the last after token T.
    """
    out_dtype = v.dtype
    batch, length, heads, key_dim = q.shape
    working = torch.promote_types(v.dtype, torch.float32)
    q, k, v, gk = (x.transpose(1, 2).to(working) for x in (q, k, v, gk))
    q = q * (key_dim**-0.5 if scale is None else scale)
    pad = (-length) % chunk_size  # padded tokens: k = v = 0 and no decay, so the state passes through unchanged
    q, k, v, gk = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, gk))
    chunks = (length + pad) // chunk_size
    q, k, v, gk = (x.reshape(batch, heads, chunks, chunk_size, -1) for x in (q, k, v, gk))
    cumulative = gk.cumsum(-2)
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()

    state = q.new_zeros(batch, heads, key_dim, v.shape[-1]) if initial_state is None else initial_state.to(q.dtype)
    out = torch.empty_like(v)
    states = []
    for i in range(chunks):
        g, qi, ki, vi = cumulative[:, :, i], q[:, :, i], k[:, :, i], v[:, :, i]  # g [B, H, C, K]
        decay = (g[:, :, :, None] - g[:, :, None]).masked_fill(~causal[..., None], float("-inf")).exp()
        scores = torch.einsum("bhik,bhjk,bhijk->bhij", qi, ki, decay)
        out[:, :, i] = (qi * g.exp()) @ state + scores @ vi
        last = g[:, :, -1:]  # [B, H, 1, K]
        state = state * last.transpose(-1, -2).exp() + (ki * (last - g).exp()).transpose(-1, -2) @ vi
        if return_chunk_states:
            states.append(state)
    out = out.reshape(batch, heads, -1, out.shape[-1])[:, :, :length].transpose(1, 2).to(out_dtype)
    chunk_states = torch.stack(states, dim=2) if return_chunk_states else None
    return out, (state if output_final_state else None), chunk_states


def recurrent_gla_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token GLA in working precision (the naive reference, and the decode step).
    Returns ``(o [B, T, H, V] in v's dtype, final state [B, H, K, V] in working precision or None)``."""
    out_dtype = v.dtype
    key_dim = q.shape[-1]
    working = torch.promote_types(v.dtype, torch.float32)
    q, k, v, gk = (x.transpose(1, 2).to(working) for x in (q, k, v, gk))
    q = q * (key_dim**-0.5 if scale is None else scale)
    batch, heads, length, _ = q.shape
    state = q.new_zeros(batch, heads, key_dim, v.shape[-1]) if initial_state is None else initial_state.to(q.dtype)
    out = torch.empty_like(v)
    for t in range(length):
        state = state * gk[:, :, t].exp()[..., None] + k[:, :, t, :, None] * v[:, :, t, None, :]
        out[:, :, t] = (state * q[:, :, t, :, None]).sum(-2)
    return out.transpose(1, 2).to(out_dtype), (state if output_final_state else None)


def gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's recurrence at ``scale`` (None: d_k^-0.5): fla on CUDA tensors (every head a packed sequence;
    outside autograd the chunked form beneath fla's wrappers and without its read of the GPU,
    ``fla_chunk.chunk_gla``), PyTorch otherwise.
    Returns ``(o [B, T, H, V], final state [B, H, K, V] or None)``."""
    options = dict(initial_state=initial_state, output_final_state=output_final_state, scale=scale)
    single_step = q.shape[1] == 1 and initial_state is not None
    if q.is_cuda and HAS_FLA:
        if single_step:
            return heads_as_sequences(_fla_recurrent, dict(q=q, k=k, v=v, gk=gk), **options)
        if direct(q, gla_forward):
            return heads_as_sequences(unwrapped_chunk, dict(q=q, k=k, v=v, g=gk),
                                      also=("chunk_indices", "chunk_offsets"), **options)
        return heads_as_sequences(_fla_chunk, dict(q=q, k=k, v=v, g=gk), also=("cu_seqlens_cpu",), **options)
    if single_step:
        return recurrent_gla_torch(q, k, v, gk, **options)
    return chunk_gla_torch(q, k, v, gk, **options)[:2]


def token_major_gla(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor,
    initial_state: torch.Tensor | None = None, output_final_state: bool = False, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunked recurrence through fla's direct chunked forward (``fla_chunk.chunk_gla``, which callers check with
    ``fla_chunk.direct``) in fla's own layout: tokens major, each of the B sequences a packed sequence of H heads, H a
    compile-time constant of fla's kernels (every distinct H compiles them once: callers keep it to one count per
    model, ``PrunedFlaGLA.token_major_heads``). Nothing is copied into head-major order.

    Shapes: q, k, gk [B, T, H, K], v [B, T, H, V], contiguous; states [B, H, K, V].
    Returns ``(o [B, T, H, V], final state [B, H, K, V] float32 or None)``."""
    batch, length, heads = v.shape[:3]
    index = sequence_index(batch, length, v.device)
    packed = (x.reshape(1, batch * length, heads, x.shape[-1]) for x in (q, k, v, gk))
    out, final = unwrapped_chunk(*packed, initial_state, output_final_state, cu_seqlens=index["cu_seqlens"],
                                 chunk_indices=index["chunk_indices"], chunk_offsets=index["chunk_offsets"],
                                 scale=scale)
    return out.view(batch, length, heads, out.shape[-1]), final
