"""fla's chunked forward passes of the (gated) delta rule, beneath the wrappers of its public functions.

Shipped inside output folders (imports only torch and ``fla_decode_step``'s launch helper; fla is looked up at the
first call). fla's public ``chunk_gated_delta_rule`` and ``chunk_delta_rule`` wrap their forward functions in an
autograd Function that saves the inputs, a device guard that checks every argument, dtype casts for autocast, a
backend dispatch and argument checks: host time that a small model's prefill spends in every layer, and that a
forward outside autograd on inputs already packed (``packed_heads.heads_as_sequences``: contiguous, one device)
does not need. ``gated_delta_forward()`` and ``delta_forward()`` are fla 0.6's ``chunk_gated_delta_rule_fwd`` and
``chunk_delta_rule_fwd`` where their parameters are the ones this code passes, else None; ``direct()`` says when
the functions below may replace the public ones, which callers take otherwise.

Shapes (heads packed as sequences): q, k [1, N, 1, K]; v [1, N, 1, V]; g (log decay), beta [1, N, 1]; states
[S, 1, K, V] for S sequences; ``cu_seqlens`` [S + 1] and ``chunk_indices`` [⌈·/64⌉ chunks, 2] from
``packed_heads.sequence_index``.
"""

from __future__ import annotations

import importlib
import inspect
from functools import lru_cache

import torch

from .fla_decode_step import launching_on

GATED_DELTA_PARAMETERS = (
    "q", "k", "v", "g", "beta", "scale", "initial_state", "output_final_state", "state_v_first", "cu_seqlens",
    "cp_context", "chunk_indices", "use_gate_in_kernel", "A_log", "dt_bias", "chunk_size",
)
"""The parameters of fla 0.6's ``chunk_gated_delta_rule_fwd``, in order."""

DELTA_PARAMETERS = (
    "q", "k", "v", "beta", "scale", "initial_state", "output_final_state", "cu_seqlens", "chunk_indices", "chunk_size",
)
"""The parameters of fla 0.6's ``chunk_delta_rule_fwd``, in order."""


def fla_function(module_name: str, name: str, parameters: tuple[str, ...]):
    """fla's function ``module_name.name`` if its parameters are ``parameters``, else None."""
    try:
        function = getattr(importlib.import_module(module_name), name)
        found = tuple(inspect.signature(function).parameters)
    except Exception:  # no fla, fla without triton, or no such function
        return None
    return function if found == parameters else None


@lru_cache(maxsize=1)
def gated_delta_forward():
    """fla's ``chunk_gated_delta_rule_fwd`` if its parameters are ``GATED_DELTA_PARAMETERS``, else None."""
    return fla_function("fla.ops.gated_delta_rule.chunk", "chunk_gated_delta_rule_fwd", GATED_DELTA_PARAMETERS)


@lru_cache(maxsize=1)
def delta_forward():
    """fla's ``chunk_delta_rule_fwd`` if its parameters are ``DELTA_PARAMETERS``, else None."""
    return fla_function("fla.ops.delta_rule.chunk", "chunk_delta_rule_fwd", DELTA_PARAMETERS)


def direct(x: torch.Tensor, forward) -> bool:
    """Whether ``forward`` (one of the lookups above) was found and may run x's prefill without fla's wrappers: a
    GPU tensor, outside autograd, autocast (the wrappers' casts) and ``torch.compile`` (which fla's public functions
    keep out of its graphs)."""
    return (x.is_cuda and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cuda")
            and not torch.compiler.is_compiling() and forward() is not None)


def chunk_gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    initial_state: torch.Tensor | None = None, output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None, chunk_indices: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla's ``chunk_gated_delta_rule`` at its default scale d_k^-0.5, for q and k normalised already
    (``use_qk_l2norm_in_kernel`` must be False), through ``gated_delta_forward()``.
    Returns ``(o [1, N, 1, V] in q's dtype, final state [S, 1, K, V] float32 or None)``."""
    if use_qk_l2norm_in_kernel:
        raise ValueError("the direct chunked forward takes queries and keys normalised already")
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    with launching_on(q):
        _, out, _, final, _, _ = gated_delta_forward()(
            q=q, k=k, v=v, g=g, beta=beta, scale=k.shape[-1] ** -0.5,
            initial_state=None if initial_state is None else initial_state.contiguous(),
            output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_indices=chunk_indices,
        )
    return out.to(q.dtype), final


def chunk_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
    initial_state: torch.Tensor | None = None, output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None, chunk_indices: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla's ``chunk_delta_rule`` at its default scale d_k^-0.5, for q and k normalised already
    (``use_qk_l2norm_in_kernel`` must be False), through ``delta_forward()``.
    Returns ``(o [1, N, 1, V] in q's dtype, final state [S, 1, K, V] float32 or None)``."""
    if use_qk_l2norm_in_kernel:
        raise ValueError("the direct chunked forward takes queries and keys normalised already")
    q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
    with launching_on(q):
        out, _, final = delta_forward()(
            q=q, k=k, v=v, beta=beta, scale=k.shape[-1] ** -0.5,
            initial_state=None if initial_state is None else initial_state.contiguous(),
            output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_indices=chunk_indices,
        )
    return out.to(q.dtype), final
