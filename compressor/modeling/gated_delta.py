"""Gated delta rule recurrences: a PyTorch reference for CPU tensors, fla's Triton kernels for CUDA tensors.

Shipped inside every output folder (imports only torch and, optionally, fla and triton). All functions but
``shared_key_gated_delta_rule`` take heads that are already aligned: queries and keys have one head per value head
(grouped heads are expanded by the caller), so one signature serves every head layout.
The PyTorch forms compute in working precision: float32, or float64 for float64 inputs.

Shapes: q, k [B, T, H, K]; v [B, T, H, V]; g (log decay), beta [B, T, H]; states [B, H, K, V].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # fla is optional: without it, CUDA tensors use the PyTorch reference too.
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as _fla_chunk
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as _fla_recurrent

    HAS_FLA = True
except Exception:  # ImportError, or fla without triton
    HAS_FLA = False

from .channel_gate import chunk_cumulative
from .channel_gate import runs as channel_gate_runs
from .fla_chunk import chunk_gated_delta_rule as unwrapped_chunk
from .fla_chunk import direct, gated_delta_forward
from .fla_decode_step import can_step_in_place, step_in_place
from .packed_heads import MAX_BATCH_ENTRIES, heads_as_batch, heads_as_sequences, key_heads_as_batch, normalised_pair


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Normalise the last dimension to unit L2 norm (fla's convention: x / sqrt(sum x² + eps))."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def chunk_gated_delta_rule_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    chunk_size: int = 64,
    return_chunk_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Chunked gated delta rule in working precision (WY representation, one sequential step per chunk).

    Returns ``(o [B, T, H, V] in v's dtype, final state [B, H, K, V] in working precision or None,
    chunk states [B, H, N, K, V] in working precision or None)``: the state after each chunk of ``chunk_size`` tokens,
    the last one after token T (N = ceil(T / chunk_size)).
    """
    out_dtype = v.dtype
    batch, length, heads, key_dim = q.shape
    working = torch.promote_types(v.dtype, torch.float32)
    q, k, v, beta, g = (x.transpose(1, 2).to(working) for x in (q, k, v, beta, g))
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    q = q * (key_dim**-0.5 if scale is None else scale)

    pad = (-length) % chunk_size
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    beta, g = (F.pad(x, (0, pad)) for x in (beta, g))
    chunks = (length + pad) // chunk_size
    q, k, v = (x.reshape(batch, heads, chunks, chunk_size, -1) for x in (q, k, v))
    beta = beta.reshape(batch, heads, chunks, chunk_size, 1)
    g = g.reshape(batch, heads, chunks, chunk_size).cumsum(-1)

    upper = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).triu(1)
    decay = (g[..., :, None] - g[..., None, :]).masked_fill(upper, float("-inf")).exp()
    k_beta = k * beta
    system = (k_beta @ k.transpose(-1, -2)) * decay
    u = torch.linalg.solve_triangular(system, v * beta, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, k_beta * g.exp()[..., None], upper=False, unitriangular=True)
    attn = (q @ k.transpose(-1, -2)) * decay
    q_decayed = q * g.exp()[..., None]
    k_decayed = k * (g[..., -1:] - g).exp()[..., None]
    chunk_decay = g[..., -1].exp()[..., None, None]

    state = q.new_zeros(batch, heads, key_dim, v.shape[-1]) if initial_state is None else initial_state.to(q.dtype)
    out = torch.empty_like(v)
    states = []
    for i in range(chunks):
        v_new = u[:, :, i] - w[:, :, i] @ state
        out[:, :, i] = q_decayed[:, :, i] @ state + attn[:, :, i] @ v_new
        state = state * chunk_decay[:, :, i] + k_decayed[:, :, i].transpose(-1, -2) @ v_new
        if return_chunk_states:
            states.append(state)
    out = out.reshape(batch, heads, -1, out.shape[-1])[:, :, :length].transpose(1, 2).to(out_dtype)
    chunk_states = torch.stack(states, dim=2) if return_chunk_states else None
    return out, (state if output_final_state else None), chunk_states


def recurrent_gated_delta_rule_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token gated delta rule in working precision: the naive reference, and the decode step.

    S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - k_t^T exp(g_t) S_{t-1}))^T,  o_t = S_t^T q_t.
    Returns ``(o [B, T, H, V] in v's dtype, final state [B, H, K, V] in working precision or None)``.
    """
    out_dtype = v.dtype
    key_dim = q.shape[-1]
    working = torch.promote_types(v.dtype, torch.float32)
    q, k, v, beta, g = (x.transpose(1, 2).to(working) for x in (q, k, v, beta, g))
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    q = q * (key_dim**-0.5 if scale is None else scale)
    batch, heads, length, _ = q.shape
    state = q.new_zeros(batch, heads, key_dim, v.shape[-1]) if initial_state is None else initial_state.to(q.dtype)
    out = torch.empty_like(v)
    for t in range(length):
        state = state * g[:, :, t].exp()[..., None, None]
        predicted = (state * k[:, :, t, :, None]).sum(-2)
        delta = (v[:, :, t] - predicted) * beta[:, :, t, None]
        state = state + k[:, :, t, :, None] * delta[:, :, None, :]
        out[:, :, t] = (state * q[:, :, t, :, None]).sum(-2)
    return out.transpose(1, 2).to(out_dtype), (state if output_final_state else None)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's recurrence at ``scale`` (None: d_k^-0.5), with q/k L2-normalised inside (``use_qk_l2norm``; False
    for q and k normalised already, as the fused short convolutions of fla's layer hand them): fla on CUDA tensors
    (every head a packed sequence, or a batch entry of its own: see ``packed_heads.py``; outside autograd, up to
    ``MAX_BATCH_ENTRIES`` heads, the chunked form beneath fla's wrappers, ``fla_chunk.py``, from g's chunk-local sums
    by ``channel_gate.chunk_cumulative``), PyTorch otherwise.

    A single token with an initial state takes the recurrent step; longer inputs the chunked form. The step through
    fla writes the final state over ``initial_state`` where it can (float32 and contiguous, as a cache keeps it, and
    q and k normalised in its kernel; see ``fla_decode_step.py``) and returns that tensor, which a cache's copy into
    itself then skips.
    Returns ``(o [B, T, H, V], final state [B, H, K, V] or None)``.
    """
    single_step = q.shape[1] == 1 and initial_state is not None
    options = dict(initial_state=initial_state, output_final_state=output_final_state,
                   use_qk_l2norm_in_kernel=use_qk_l2norm, scale=scale)
    if q.is_cuda and HAS_FLA:
        if single_step:
            in_place = use_qk_l2norm and output_final_state and can_step_in_place(initial_state)
            step = step_in_place if in_place else _fla_recurrent
            return heads_as_batch(step, dict(q=q, k=k, v=v, g=g, beta=beta), **options)
        if use_qk_l2norm:
            q, k = normalised_pair(q, k)
        per_head = dict(q=q, k=k, v=v, g=g, beta=beta)
        options["use_qk_l2norm_in_kernel"] = False
        if direct_chunked(q, q.shape[0], v.shape[2]):
            return heads_as_batch(summed_chunk, per_head, **options)
        return heads_as_sequences(_fla_chunk, per_head, also=("chunk_indices",), **options)
    if single_step:
        return recurrent_gated_delta_rule_torch(q, k, v, g, beta, **options)
    return chunk_gated_delta_rule_torch(q, k, v, g, beta, **options)[:2]


def direct_chunked(x: torch.Tensor, batch: int, value_heads: int, values_per_entry: int = 1) -> bool:
    """Whether a prefill of ``batch`` sequences of ``value_heads`` value heads, ``values_per_entry`` of them to each
    batch entry (x: any tensor on its device), takes fla's direct chunked forward (``fla_chunk.direct``; the decay's
    sums by ``channel_gate.chunk_cumulative``, its channels an entry's value heads; fla's kernels put every value
    head of the batch in a grid dimension, so no more than ``MAX_BATCH_ENTRIES`` of them)."""
    return (direct(x, gated_delta_forward) and channel_gate_runs(x, values_per_entry)
            and batch * value_heads <= MAX_BATCH_ENTRIES)


def summed_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                 **options) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``fla_chunk.chunk_gated_delta_rule`` handed the log decay g [S, T, HV] itself, of which it first takes the
    chunk-local sums in base 2 in one launch (``channel_gate.chunk_cumulative``, whose channels here are the HV value
    heads of each entry)."""
    sums = chunk_cumulative(g.float().unsqueeze(2)).squeeze(2)
    return unwrapped_chunk(q=q, k=k, v=v, g=sums, beta=beta, **options)


def shared_key_gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    initial_state: torch.Tensor | None = None, output_final_state: bool = False, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunked recurrence of value heads that share key heads, r per key head in the stock grouping, through fla's
    direct chunked forward (``summed_chunk``, which callers check with ``direct_chunked``), in fla's layout for them
    (``packed_heads.key_heads_as_batch``: each key head read once, not copied per value head). q and k are
    L2-normalised already.

    Shapes: q, k [B, T, H_k, K]; v [B, T, H_k, r, V]; g, beta [B, T, H_k, r] (value head j at [..., j // r, j % r]);
    states [B, H_k·r, K, V]. Returns ``(o [B, T, H_k, r, V], final state [B, H_k·r, K, V] float32 or None)``."""
    return key_heads_as_batch(summed_chunk, dict(q=q, k=k), dict(v=v, g=g, beta=beta), initial_state,
                              output_final_state=output_final_state, scale=scale)
