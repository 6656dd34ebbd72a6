"""Gated delta rule recurrences: a PyTorch reference for CPU tensors, fla's Triton kernels for CUDA tensors.

Shipped inside every output folder (imports only torch and, optionally, fla). All functions take heads that are
already aligned: queries and keys have one head per value head (grouped heads are expanded by the caller), so
one signature serves every head layout.

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

try:  # fla's chunked forward, step by step, to read the chunk states it computes (private API of fla 0.6)
    import triton as _triton
    from fla.modules.norm.l2norm import l2norm_fwd as _fla_l2norm
    from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_h as _fla_fwd_h
    from fla.ops.common.chunk_o import chunk_fwd_o as _fla_fwd_o
    from fla.ops.gated_delta_rule.chunk_fwd import chunk_gated_delta_rule_fwd_intra as _fla_fwd_intra
    from fla.ops.utils import chunk_local_cumsum as _fla_cumsum
    from fla.ops.utils.constant import RCP_LN2 as _RCP_LN2

    HAS_FLA_STATES = HAS_FLA and hasattr(getattr(_triton, "knobs", None), "language")
except Exception:
    HAS_FLA_STATES = False

STATES_DOT_PRECISION = "tf32x3"
"""Triton's precision for float32 dot products while fla computes chunk states: ``tf32x3`` (three TF32 products
per float32 one, float32 accuracy on tensor cores) or ``ieee``. On an H200, a 1.4B model's states (and its output,
then in the same precision) cost 1.18× a plain forward pass with tf32x3 and 1.33× with ieee, with the same threshold
ranks as the PyTorch float32 reference for 99.3 % and 99.2 % of them (scripts/bench_calibration.py). GPUs without
TF32 (before NVIDIA's compute capability 8.0) and AMD GPUs take ``ieee``: see :func:`states_dot_precision`."""


def states_dot_precision(device: torch.device) -> str:
    """``STATES_DOT_PRECISION`` on an NVIDIA GPU with TF32 (compute capability 8.0 or newer), ``ieee`` otherwise."""
    nvidia_with_tf32 = torch.version.hip is None and torch.cuda.get_device_capability(device) >= (8, 0)
    return STATES_DOT_PRECISION if nvidia_with_tf32 else "ieee"


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
    """Chunked gated delta rule in float32 (WY representation, one sequential step per chunk).

    Returns ``(o [B, T, H, V] in v's dtype, final state [B, H, K, V] float32 or None,
    chunk states [B, H, N, K, V] float32 or None)``: the state after each chunk of ``chunk_size`` tokens,
    the last one after token T (N = ceil(T / chunk_size)).
    """
    out_dtype = v.dtype
    batch, length, heads, key_dim = q.shape
    q, k, v, beta, g = (x.transpose(1, 2).float() for x in (q, k, v, beta, g))
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

    state = q.new_zeros(batch, heads, key_dim, v.shape[-1]) if initial_state is None else initial_state.float()
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


def chunk_gated_delta_rule_fla_states(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    chunk_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """fla's chunked forward (q/k L2-normalised inside) on CUDA tensors, with its chunk states in strict float32.

    The inputs are taken in float32 and, while fla computes the states, Triton's float32 dot products run in
    :func:`states_dot_precision` (float32 accuracy, not plain TF32), so the states carry no bf16 rounding or TF32
    noise. The states are the ones the kernel computes for the output, read in the same pass. The output, which is
    rounded to v's dtype, takes Triton's default float32 precision, as fla computes a float32 model's output (TF32
    on NVIDIA GPUs since Ampere): its error, about 5e-4 of a term, is under bf16's rounding (4e-3). (Triton caches
    compiled kernels without their dot precision: in a process that already ran fla on float32 inputs, those
    kernels are reused.) Returns ``(o [B, T, H, V] in v's dtype, final state [B, H, K, V] float32 or None, chunk
    states [B, H, N, K, V] float32)`` (N = ceil(T / chunk_size), the last one after token T); with
    ``chunk_index`` (LongTensor [n] on the device), only those chunks' states, [B, H, n, K, V], gathered without
    copying the others.
    """
    out_dtype = v.dtype
    v, beta = v.float().contiguous(), beta.float().contiguous()
    language = _triton.knobs.language
    previous = language.fp32_default
    language.fp32_default = states_dot_precision(q.device)
    try:  # the L2 norm reads q and k in their own dtype and writes them in float32 (no copy in float32 first)
        q, k = (_fla_l2norm(x.contiguous(), output_dtype=torch.float32)[0] for x in (q, k))
        g = _fla_cumsum(g.float().contiguous(), chunk_size=chunk_size, scale=_RCP_LN2)
        w, u, _ = _fla_fwd_intra(k=k, v=v, g=g, beta=beta, chunk_size=chunk_size)
        h, v_new, final = _fla_fwd_h(
            k=k, w=w, u=u, g=g, initial_state=None if initial_state is None else initial_state.float(),
            output_final_state=True, chunk_size=chunk_size,
        )
    finally:
        language.fp32_default = previous
    out = _fla_fwd_o(q=q, k=k, v=v_new, h=h, g=g, scale=q.shape[-1] ** -0.5, chunk_size=chunk_size)
    # h[:, i] is the state before chunk i: the state after chunk i is h[:, i + 1], after the last one ``final``.
    if chunk_index is None:
        chunk_states = torch.cat([h[:, 1:], final[:, None]], dim=1)
    else:
        last = h.shape[1] - 1
        after = h.index_select(1, (chunk_index + 1).clamp(max=last))
        chunk_states = torch.where((chunk_index == last)[:, None, None, None], final[:, None], after)
    chunk_states = chunk_states.transpose(1, 2)
    return out.to(out_dtype), (final if output_final_state else None), chunk_states


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
    """Token-by-token gated delta rule in float32: the naive reference, and the decode step.

    S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - k_t^T exp(g_t) S_{t-1}))^T,  o_t = S_t^T q_t.
    Returns ``(o [B, T, H, V] in v's dtype, final state [B, H, K, V] float32 or None)``.
    """
    out_dtype = v.dtype
    key_dim = q.shape[-1]
    q, k, v, beta, g = (x.transpose(1, 2).float() for x in (q, k, v, beta, g))
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    q = q * (key_dim**-0.5 if scale is None else scale)
    batch, heads, length, _ = q.shape
    state = q.new_zeros(batch, heads, key_dim, v.shape[-1]) if initial_state is None else initial_state.float()
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
    return_chunk_states: bool = False,
    chunk_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The layer's recurrence, with q/k L2-normalised inside: fla on CUDA tensors, PyTorch otherwise.

    A single token with an initial state takes the recurrent step; longer inputs the chunked form.
    Chunk states are computed in float32 (no plain TF32, no bf16 intermediates): on CUDA by fla's kernels on
    float32 inputs with float32-accurate dot products (:func:`chunk_gated_delta_rule_fla_states`), elsewhere by
    the PyTorch recurrence. bf16 intermediates (fla rounds the chunk's new values to the inputs' dtype) add noise
    of about 1e-3 of the state's scale, which swamps the singular values that a threshold rank at eps = 1e-4
    counts; threshold ranks equal the PyTorch float32 reference's for 98.8 % of a 1.4B model's states with plain
    TF32 everywhere (H100), 99.2 % with IEEE and 99.3 % with tf32x3 everywhere, and 98.7 % with tf32x3 states and
    the output in TF32 (H200; scripts/bench_calibration.py), which is what runs: the output's TF32 error (about 5e-4 of
    a term) is under its bf16 rounding (4e-3) but flips some roundings, which the next layers' states follow; it
    takes 0.07× a forward pass less (analyze with log steps: 1.27× against 1.34×).
    Returns ``(o [B, T, H, V], final state [B, H, K, V] or None, chunk states [B, H, N, K, V] or None)``; with
    ``chunk_index`` (LongTensor [n]), the chunk states of those chunks only, [B, H, n, K, V].
    """
    single_step = q.shape[1] == 1 and initial_state is not None and not return_chunk_states
    if return_chunk_states and q.is_cuda and HAS_FLA_STATES:
        return chunk_gated_delta_rule_fla_states(
            q, k, v, g, beta, initial_state=initial_state, output_final_state=output_final_state,
            chunk_index=chunk_index,
        )
    if return_chunk_states:
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            out, final, states = chunk_gated_delta_rule_torch(
                q, k, v, g, beta, initial_state=initial_state, output_final_state=output_final_state,
                use_qk_l2norm_in_kernel=True, return_chunk_states=True,
            )
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        return out, final, states if chunk_index is None else states.index_select(2, chunk_index)
    if q.is_cuda and HAS_FLA:
        kernel = _fla_recurrent if single_step else _fla_chunk
        out, final = kernel(
            q, k, v, g=g, beta=beta, initial_state=initial_state,
            output_final_state=output_final_state, use_qk_l2norm_in_kernel=True,
        )
        return out, final, None
    if single_step:
        out, final = recurrent_gated_delta_rule_torch(
            q, k, v, g, beta, initial_state=initial_state, output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=True,
        )
        return out, final, None
    return chunk_gated_delta_rule_torch(
        q, k, v, g, beta, initial_state=initial_state, output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=True,
    )
