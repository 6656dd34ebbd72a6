"""One decode token of the gated delta rule, or of KDA, through fla's kernels, the state written over itself.

Shipped inside output folders (imports only torch; fla is looked up at the first call). fla's public
``fused_recurrent_gated_delta_rule`` and ``fused_recurrent_kda`` write the new state to a tensor of their own, which
transformers' cache then copies into the tensor it keeps: every decode step reads and writes each state twice, and
at large batch those states are most of the bytes a step moves. fla's kernels load each block of the state before
they store the same block, so they may take the cache's tensor as both the initial and the final state.
``step_in_place`` launches the gated delta rule's kernel that way, when it takes exactly the arguments of the fla
version this code was written for (0.6); ``kda_step_in_place`` asks fla's own KDA forward for it
(``inplace_final_state``). ``kernel()`` or ``kda_step()`` is None where fla differs, and callers take fla's public
functions.

Shapes (heads as batch entries, see ``packed_heads.heads_as_batch``): q, k [N, 1, 1, K]; v [N, 1, 1, V]; g (log
decay) [N, 1, 1] (gated delta rule) or [N, 1, 1, K] (KDA, per key channel); beta [N, 1, 1]; state [N, 1, K, V]
float32, contiguous (KDA's also value-first, [N, 1, V, K]).
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from functools import lru_cache

import torch

KERNEL_ARGUMENTS = (
    "q", "k", "v", "g", "gk", "gv", "beta", "A_log", "dt_bias", "o", "h0", "ht", "cu_seqlens", "scale", "T", "H",
    "HV", "K", "V", "BK", "BV", "USE_G", "USE_GK", "USE_GV", "USE_QK_L2NORM_IN_KERNEL", "IS_BETA_HEADWISE",
    "USE_INITIAL_STATE", "STORE_FINAL_STATE", "STATE_V_FIRST", "IS_VARLEN", "USE_GATE_IN_KERNEL", "HAS_DT_BIAS",
    "APPLY_BETA_SIGMOID", "ALLOW_NEG_EIGVAL",
)
"""The arguments of fla 0.6's ``fused_recurrent_gated_delta_rule_fwd_kernel``, in order."""


@lru_cache(maxsize=1)
def kernel():
    """fla's fused recurrent gated delta rule kernel if its arguments are ``KERNEL_ARGUMENTS``, else None."""
    try:
        from fla.ops.gated_delta_rule import fused_recurrent
    except Exception:  # no fla, or fla without triton
        return None
    found = getattr(fused_recurrent, "fused_recurrent_gated_delta_rule_fwd_kernel", None)
    return found if tuple(getattr(found, "arg_names", ())) == KERNEL_ARGUMENTS else None


KDA_STEP_ARGUMENTS = frozenset({"scale", "initial_state", "output_final_state", "inplace_final_state",
                                 "use_qk_l2norm_in_kernel", "out", "state_v_first"})
"""Arguments of fla 0.6's ``fused_recurrent_kda_fwd`` that ``kda_step_in_place`` passes beside q, k, v, g, beta."""


@lru_cache(maxsize=1)
def kda_step():
    """fla's ``fused_recurrent_kda_fwd`` if it takes ``KDA_STEP_ARGUMENTS``, else None."""
    try:
        from fla.ops.kda import fused_recurrent
        parameters = inspect.signature(fused_recurrent.fused_recurrent_kda_fwd).parameters
    except Exception:  # no fla, fla without triton, or a function of another shape
        return None
    return fused_recurrent.fused_recurrent_kda_fwd if KDA_STEP_ARGUMENTS <= set(parameters) else None


def updatable(state: torch.Tensor | None) -> bool:
    """Whether a kernel may write a decode step's state over ``state``: float32, contiguous, on a GPU, outside
    autograd (the kernels have no backward, and autograd may keep the old state)."""
    return (state is not None and state.is_cuda and state.dtype == torch.float32 and state.is_contiguous()
            and not torch.is_grad_enabled())


def can_step_in_place(state: torch.Tensor | None) -> bool:
    """Whether ``step_in_place`` can update ``state`` with the fla found."""
    return updatable(state) and kernel() is not None


def can_step_kda_in_place(state: torch.Tensor | None) -> bool:
    """Whether ``kda_step_in_place`` can update ``state`` with the fla found."""
    return updatable(state) and kda_step() is not None


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def launching_on(x: torch.Tensor):
    """Triton launches on the current device: a context that makes it x's (none for a CPU tensor)."""
    return torch.cuda.device(x.device) if x.is_cuda else nullcontext()


def step_in_place(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    initial_state: torch.Tensor, output_final_state: bool = True, use_qk_l2norm_in_kernel: bool = True,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fla's ``fused_recurrent_gated_delta_rule`` for one token at ``scale`` (None: d_k^-0.5) with q/k
    L2-normalised in the kernel (``use_qk_l2norm_in_kernel`` must be True), writing the new state over
    ``initial_state`` (``output_final_state`` must be True). CPU tensors only under Triton's interpreter.
    Returns ``(o [N, 1, 1, V], initial_state)``."""
    if not (output_final_state and use_qk_l2norm_in_kernel):
        raise ValueError("step_in_place returns the state it updates and normalises q and k in the kernel")
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    count, _, _, key_dim = k.shape
    value_dim = v.shape[-1]
    block_v = min(8, next_power_of_2(value_dim))
    out = torch.empty_like(v)
    with launching_on(v):
        kernel()[(-(-value_dim // block_v) * count,)](
            q=q, k=k, v=v, g=g, gk=None, gv=None, beta=beta, A_log=None, dt_bias=None, o=out, h0=initial_state,
            ht=initial_state, cu_seqlens=None, scale=key_dim**-0.5 if scale is None else scale, T=1, H=1, HV=1,
            K=key_dim, V=value_dim, BK=next_power_of_2(key_dim), BV=block_v, USE_QK_L2NORM_IN_KERNEL=True,
            IS_BETA_HEADWISE=True, STATE_V_FIRST=False, APPLY_BETA_SIGMOID=False, ALLOW_NEG_EIGVAL=False, num_warps=1,
            num_stages=3,
        )
    return out, initial_state


def kda_step_in_place(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    initial_state: torch.Tensor, output_final_state: bool = True, use_qk_l2norm_in_kernel: bool = True,
    scale: float | None = None, state_v_first: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fla's ``fused_recurrent_kda`` for one token at ``scale`` (None: d_k^-0.5) with q/k L2-normalised in the
    kernel (``use_qk_l2norm_in_kernel`` must be True), writing the new state over ``initial_state`` ([N, 1, V, K]
    with ``state_v_first``; ``output_final_state`` must be True). CPU tensors only under Triton's interpreter.
    Returns ``(o [N, 1, 1, V], initial_state)``."""
    if not (output_final_state and use_qk_l2norm_in_kernel):
        raise ValueError("kda_step_in_place returns the state it updates and normalises q and k in the kernel")
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    with launching_on(v):
        return kda_step()(q=q, k=k, v=v, g=g, beta=beta, scale=scale, initial_state=initial_state,
                          output_final_state=True, inplace_final_state=True, use_qk_l2norm_in_kernel=True,
                          out=torch.empty_like(v), state_v_first=state_v_first)
