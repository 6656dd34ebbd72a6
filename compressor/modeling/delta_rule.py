"""Delta rule recurrences (DeltaNet): a PyTorch reference for CPU tensors, fla's Triton kernels for CUDA tensors.

Shipped inside output folders of fla DeltaNet models (imports only torch and, optionally, fla). The delta rule is
the gated delta rule without decay: S_t = S_{t-1} + k_t (beta_t (v_t - S_{t-1}^T k_t))^T, o_t = S_t^T q_t · scale,
so the PyTorch forms are those of ``gated_delta.py`` with log-decay g = 0 (exp(0) = 1 exactly).
The PyTorch forms compute in working precision: float32, or float64 for float64 inputs.

Shapes: q, k [B, T, H, K]; v [B, T, H, V]; beta [B, T, H]; states [B, H, K, V].
"""

from __future__ import annotations

import torch

from .gated_delta import chunk_gated_delta_rule_torch, recurrent_gated_delta_rule_torch

try:  # fla is optional: without it, CUDA tensors use the PyTorch reference too.
    from fla.ops.delta_rule import chunk_delta_rule as _fla_chunk
    from fla.ops.delta_rule import fused_recurrent_delta_rule as _fla_recurrent

    HAS_FLA = True
except Exception:  # ImportError, or fla without triton
    HAS_FLA = False

from .fla_chunk import chunk_delta_rule as unwrapped_chunk
from .fla_chunk import delta_forward, direct
from .packed_heads import MAX_BATCH_ENTRIES, heads_as_batch, heads_as_sequences, normalised_pair


def _no_decay(beta: torch.Tensor) -> torch.Tensor:
    return torch.zeros(beta.shape, dtype=torch.float32, device=beta.device)


def chunk_delta_rule_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    chunk_size: int = 64,
    return_chunk_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Chunked delta rule in working precision. Returns ``(o [B, T, H, V] in v's dtype, final state [B, H, K, V] or
    None, chunk states [B, H, N, K, V] or None)``, states in working precision, N = ceil(T / chunk_size), the last
    after token T."""
    return chunk_gated_delta_rule_torch(
        q, k, v, _no_decay(beta), beta, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        chunk_size=chunk_size, return_chunk_states=return_chunk_states,
    )


def recurrent_delta_rule_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token delta rule in working precision (the naive reference, and the decode step).
    Returns ``(o [B, T, H, V] in v's dtype, final state [B, H, K, V] in working precision or None)``."""
    return recurrent_gated_delta_rule_torch(
        q, k, v, _no_decay(beta), beta, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
    )


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    use_qk_l2norm: bool,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's recurrence at ``scale`` (None: d_k^-0.5): fla on CUDA tensors (every head a packed sequence; outside
    autograd, up to ``MAX_BATCH_ENTRIES`` heads, a batch entry of its own through the chunked form beneath fla's
    wrappers, ``fla_chunk.py``; see ``packed_heads.py``), PyTorch otherwise (and for float32 prefill on CUDA: fla
    0.6's chunked delta rule refuses float32).
    Returns ``(o [B, T, H, V], final state [B, H, K, V] or None)``."""
    options = dict(initial_state=initial_state, output_final_state=output_final_state,
                   use_qk_l2norm_in_kernel=use_qk_l2norm, scale=scale)
    single_step = q.shape[1] == 1 and initial_state is not None
    if q.is_cuda and HAS_FLA and (single_step or q.dtype != torch.float32):
        if single_step:
            return heads_as_sequences(_fla_recurrent, dict(q=q, k=k, v=v, beta=beta), **options)
        if use_qk_l2norm:
            q, k = normalised_pair(q, k)
        per_head = dict(q=q, k=k, v=v, beta=beta)
        options["use_qk_l2norm_in_kernel"] = False
        if direct(q, delta_forward) and q.shape[0] * v.shape[2] <= MAX_BATCH_ENTRIES:
            return heads_as_batch(unwrapped_chunk, per_head, **options)
        return heads_as_sequences(_fla_chunk, per_head, also=("cu_seqlens_cpu",), **options)
    if single_step:
        return recurrent_delta_rule_torch(q, k, v, beta, **options)
    return chunk_delta_rule_torch(q, k, v, beta, **options)[:2]
