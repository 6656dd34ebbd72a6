"""Kimi Delta Attention (KDA) recurrences: a PyTorch reference for CPU tensors, fla's Triton kernels for CUDA tensors.

Shipped inside output folders of KDA models (imports only torch and, optionally, fla). KDA is the gated delta
rule with one decay per key channel instead of one per head:

    S_t = diag(exp(g_t)) S_{t-1} + k_t (beta_t (v_t - k_t^T diag(exp(g_t)) S_{t-1}))^T,   o_t = S_t^T q_t.
The PyTorch forms compute in working precision: float32, or float64 for float64 inputs.

Shapes (fla's): q, k [B, T, H, K]; v [B, T, H, V]; g (log decay per key channel) [B, T, H, K]; beta [B, T, H];
states [B, H, K, V] (``kimi_delta_attention`` also takes them value-first, [B, H, V, K]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .gated_delta import l2norm

try:  # fla is optional: without it, CUDA tensors use the PyTorch reference too.
    from fla.ops.kda import chunk_kda as _fla_chunk
    from fla.ops.kda import fused_recurrent_kda as _fla_recurrent

    HAS_FLA = True
except Exception:  # ImportError, or fla without triton
    HAS_FLA = False

from .channel_gate import DecayGate, channel_gate, chunk_cumulative, gated_chunk_cumulative
from .channel_gate import runs as channel_gate_runs
from .fla_chunk import chunk_kda as unwrapped_chunk
from .fla_chunk import direct, kda_forward
from .fla_decode_step import can_step_kda_in_place, kda_step_in_place
from .packed_heads import MAX_BATCH_ENTRIES, heads_as_batch, heads_as_sequences, key_heads_as_batch, normalised_pair


def swapped(state: torch.Tensor | None, state_v_first: bool) -> torch.Tensor | None:
    """A state [..., V, K] as [..., K, V] (or back: the swap is its own inverse, a view) where ``state_v_first``;
    otherwise the state as it is (None stays None)."""
    return state.transpose(-1, -2) if state_v_first and state is not None else state


def _prepare(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel):
    """Copies in working precision, [B, H, T, ·] layout, q/k normalised and q scaled."""
    working = torch.promote_types(v.dtype, torch.float32)
    q, k, v, g, beta = (x.transpose(1, 2).to(working) for x in (q, k, v, g, beta))
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    return q * (q.shape[-1] ** -0.5 if scale is None else scale), k, v, g, beta


def chunk_kda_torch(
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
    """Chunked KDA in working precision (WY representation, one sequential step per chunk).

    Within a chunk with cumulative log decays G_t, the per-channel decay between tokens s <= t is
    exp(G_t - G_s) <= 1, formed per chunk as a [C, C, K] tensor (never exp(-G), which overflows).
    Returns ``(o [B, T, H, V] in v's dtype, final state [B, H, K, V] in working precision or None,
    chunk states [B, H, N, K, V] in working precision or None)``: the state after each chunk of ``chunk_size`` tokens,
    the last one after token T (N = ceil(T / chunk_size)).
    """
    out_dtype = v.dtype
    length = q.shape[1]
    q, k, v, g, beta = _prepare(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel)
    batch, heads, _, key_dim = q.shape
    pad = (-length) % chunk_size
    q, k, v, g = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, g))
    beta = F.pad(beta, (0, pad))
    chunks = (length + pad) // chunk_size
    q, k, v, g = (x.reshape(batch, heads, chunks, chunk_size, -1) for x in (q, k, v, g))
    beta = beta.reshape(batch, heads, chunks, chunk_size, 1)
    g = g.cumsum(-2)

    later = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).triu(1)[..., None]  # s > t
    state = q.new_zeros(batch, heads, key_dim, v.shape[-1]) if initial_state is None else initial_state.to(q.dtype)
    out = torch.empty_like(v)
    states = []
    for i in range(chunks):
        q_i, k_i, v_i, g_i, beta_i = q[:, :, i], k[:, :, i], v[:, :, i], g[:, :, i], beta[:, :, i]
        decay = (g_i[..., :, None, :] - g_i[..., None, :, :]).masked_fill(later, float("-inf")).exp()  # [.., t, s, K]
        system = torch.einsum("bhtk,bhsk,bhtsk->bhts", k_i * beta_i, k_i, decay)
        attn = torch.einsum("bhtk,bhsk,bhtsk->bhts", q_i, k_i, decay)
        u = torch.linalg.solve_triangular(system, v_i * beta_i, upper=False, unitriangular=True)
        w = torch.linalg.solve_triangular(system, k_i * beta_i * g_i.exp(), upper=False, unitriangular=True)
        v_new = u - w @ state
        out[:, :, i] = (q_i * g_i.exp()) @ state + attn @ v_new
        last = g_i[..., -1:, :]
        state = state * last.transpose(-1, -2).exp() + (k_i * (last - g_i).exp()).transpose(-1, -2) @ v_new
        if return_chunk_states:
            states.append(state)
    out = out.reshape(batch, heads, -1, out.shape[-1])[:, :, :length].transpose(1, 2).to(out_dtype)
    chunk_states = torch.stack(states, dim=2) if return_chunk_states else None
    return out, (state if output_final_state else None), chunk_states


def naive_recurrent_kda(
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
    """Token-by-token KDA in working precision: the reference for the chunked form, and the decode step.

    Returns ``(o [B, T, H, V] in v's dtype, final state [B, H, K, V] in working precision or None)``.
    """
    out_dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta, scale, use_qk_l2norm_in_kernel)
    batch, heads, length, key_dim = q.shape
    state = q.new_zeros(batch, heads, key_dim, v.shape[-1]) if initial_state is None else initial_state.to(q.dtype)
    out = torch.empty_like(v)
    for t in range(length):
        state = state * g[:, :, t, :, None].exp()
        predicted = (state * k[:, :, t, :, None]).sum(-2)
        delta = (v[:, :, t] - predicted) * beta[:, :, t, None]
        state = state + k[:, :, t, :, None] * delta[:, :, None, :]
        out[:, :, t] = (state * q[:, :, t, :, None]).sum(-2)
    return out.transpose(1, 2).to(out_dtype), (state if output_final_state else None)


def kimi_delta_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    decay_gate: DecayGate | None = None,
    state_v_first: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's recurrence at ``scale`` (None: d_k^-0.5), with q/k L2-normalised inside (``use_qk_l2norm``; False
    for q and k normalised already, as the fused short convolutions of fla's layer hand them): fla on CUDA tensors
    (every head a packed sequence, or a batch entry of its own: see ``packed_heads.py``; outside autograd the chunked
    form beneath fla's wrappers, ``fla_chunk.py``, from g's chunk-local sums by ``channel_gate.chunk_cumulative``),
    PyTorch otherwise.

    With ``decay_gate`` (only for CUDA tensors outside autograd, where ``channel_gate.takes`` the gate's input), g
    is the gate's input f [B, T, H, K], from which the decay is computed here: on the direct chunked path straight
    into its chunk-local sums, in one launch (``channel_gate.gated_chunk_cumulative``); elsewhere by
    ``channel_gate``.

    States are [B, H, K, V], or with ``state_v_first`` [B, H, V, K]: the layout of fla's KDA layer's cache, in which
    the direct chunked forward computes them (key-first, it transposes the initial and the final state, a copy each;
    fla's public functions take either layout; the PyTorch forms transpose them).

    A single token with an initial state takes the recurrent step; longer inputs the chunked form. The step through
    fla writes the final state over ``initial_state`` where it can (float32 and contiguous, as a cache keeps it, and
    q and k normalised in its kernel; see ``fla_decode_step.py``) and returns that tensor. Returns ``(o [B, T, H,
    V], final state or None)``.
    """
    single_step = q.shape[1] == 1 and initial_state is not None
    options = dict(initial_state=initial_state, output_final_state=output_final_state,
                   use_qk_l2norm_in_kernel=use_qk_l2norm, scale=scale)
    if decay_gate is not None and torch.is_grad_enabled():
        raise ValueError("kimi_delta_attention takes a decay gate outside autograd only (its kernel has no backward)")
    chunked = (q.is_cuda and HAS_FLA and not single_step and direct_chunked(q, g.shape[-1], v.shape[2])
               and g.stride(-1) == 1)
    if decay_gate is not None and not chunked:
        g = channel_gate(g, *decay_gate)
    if q.is_cuda and HAS_FLA:
        options["state_v_first"] = state_v_first
        if single_step:
            in_place = use_qk_l2norm and output_final_state and can_step_kda_in_place(initial_state)
            step = kda_step_in_place if in_place else _fla_recurrent
            return heads_as_batch(step, dict(q=q, k=k, v=v, g=g.float(), beta=beta), **options)
        if use_qk_l2norm:
            q, k = normalised_pair(q, k)
        options["use_qk_l2norm_in_kernel"] = False
        if chunked:
            g = chunk_cumulative(g.float()) if decay_gate is None else gated_chunk_cumulative(g, decay_gate)
            return heads_as_batch(unwrapped_chunk, dict(q=q, k=k, v=v, g=g, beta=beta), **options)
        return heads_as_sequences(_fla_chunk, dict(q=q, k=k, v=v, g=g.float(), beta=beta), also=("cu_seqlens_cpu",),
                                  **options)
    options["initial_state"] = swapped(initial_state, state_v_first)
    if single_step:
        out, final = naive_recurrent_kda(q, k, v, g, beta, **options)
    else:
        out, final = chunk_kda_torch(q, k, v, g, beta, **options)[:2]
    return out, swapped(final, state_v_first)


def direct_chunked(q: torch.Tensor, key_dim: int, value_heads: int) -> bool:
    """Whether a prefill of q [B, T, ·, ·] with ``value_heads`` value heads of ``key_dim`` key channels takes fla's
    direct chunked forward, value heads as batch entries (``fla_chunk.direct``; its decay's sums by ``channel_gate``;
    no more value heads than a grid holds, ``MAX_BATCH_ENTRIES``)."""
    return (direct(q, kda_forward) and channel_gate_runs(q, key_dim)
            and q.shape[0] * value_heads <= MAX_BATCH_ENTRIES)


def shared_key_kda(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, f: torch.Tensor, beta: torch.Tensor, decay_gate: DecayGate,
    initial_state: torch.Tensor | None = None, output_final_state: bool = False, scale: float | None = None,
    state_v_first: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunked KDA of value heads that share key heads, r per key head in the stock grouping, through fla's direct
    chunked forward (where ``direct_chunked``), in fla's layout for them (``packed_heads.key_heads_as_batch``: each
    key head read once, not copied per value head), the decay's chunk-local sums computed from the gate's input f in
    that layout (``channel_gate.gated_chunk_cumulative``). q and k are L2-normalised already; states as
    ``kimi_delta_attention`` takes them.

    Shapes: q, k [B, T, H_k, K]; v [B, T, H_k, r, V]; f [B, T, H_k·r, K] (unit channel stride); beta [B, T, H_k, r]
    (value head j at [..., j // r, j % r]); states [B, H_k·r, K, V], or [B, H_k·r, V, K] with ``state_v_first``.
    Returns ``(o [B, T, H_k, r, V], final state float32 or None)``."""
    g = gated_chunk_cumulative(f, decay_gate, values_per_key=v.shape[3])
    return key_heads_as_batch(unwrapped_chunk, dict(q=q, k=k), dict(v=v, g=g, beta=beta), initial_state,
                              output_final_state=output_final_state, scale=scale, state_v_first=state_v_first)
