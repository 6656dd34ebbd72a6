"""fla's row kernels (L2 norm, gated RMS norm) launched once on any number of rows, compiled once.

Shipped inside output folders (imports only torch; fla is looked up at the first call). fla's public ``l2norm_fwd``
and ``rms_norm_gated`` hand their Triton kernels ⌈rows / 65,536⌉ as a compile-time constant (``NB``) that only
selects an autotuning entry: layers that kept different numbers of heads would compile and tune the kernels once
per distinct value. ``NB`` appears nowhere else in the kernels, so launching them with ``NB = 1`` on every input
gives the same values with one compilation, in one launch, without the wrappers fla puts around its public
functions for autograd and backend dispatch (host time a small model's prefill spends several times per layer).
``l2norm_kernel()`` or ``gated_norm_kernel()`` is None where fla differs from the version this code was written
for (0.6), and callers compute in PyTorch.

Shapes: rows [N, D], contiguous, D ≤ 512; outputs [N, D] in the input's dtype. CPU tensors only under Triton's
interpreter.
"""

from __future__ import annotations

import importlib
from contextlib import nullcontext
from functools import lru_cache

import torch

L2NORM_ARGUMENTS = ("x", "y", "rstd", "eps", "T", "D", "BD", "NB", "BT")
"""The arguments of fla 0.6's ``l2norm_fwd_kernel``, in order."""

GATED_NORM_ARGUMENTS = (
    "x", "g", "y", "w", "b", "residual", "residual_out", "mean", "rstd", "eps", "T", "D", "BT", "BD", "NB",
    "ACTIVATION", "IS_RMS_NORM", "STORE_RESIDUAL_OUT", "HAS_RESIDUAL", "HAS_WEIGHT", "HAS_BIAS",
)
"""The arguments of fla 0.6's ``layer_norm_gated_fwd_kernel``, in order."""

GATE_ACTIVATIONS = ("silu", "swish", "sigmoid")
"""The output gates fla's gated norm kernel applies (any other name would leave the output ungated)."""

MAX_ROW_SIZE = 512
"""The widest rows these kernels take (fla launches a kernel of another shape above it)."""


def _kernel(module_name: str, kernel_name: str, arguments: tuple[str, ...]):
    try:
        module = importlib.import_module(module_name)
    except Exception:  # no fla, or fla without triton
        return None
    found = getattr(module, kernel_name, None)
    return found if tuple(getattr(found, "arg_names", ())) == arguments else None


@lru_cache(maxsize=1)
def l2norm_kernel():
    """fla's ``l2norm_fwd_kernel`` if its arguments are ``L2NORM_ARGUMENTS``, else None."""
    return _kernel("fla.modules.norm.l2norm", "l2norm_fwd_kernel", L2NORM_ARGUMENTS)


@lru_cache(maxsize=1)
def gated_norm_kernel():
    """fla's ``layer_norm_gated_fwd_kernel`` if its arguments are ``GATED_NORM_ARGUMENTS``, else None."""
    return _kernel("fla.modules.norm.fused_norm_gate", "layer_norm_gated_fwd_kernel", GATED_NORM_ARGUMENTS)


def takes(rows: torch.Tensor) -> bool:
    """Whether the row kernels take ``rows`` [N, D]: on a GPU, outside autograd (they have no backward), D ≤ 512."""
    return rows.is_cuda and not torch.is_grad_enabled() and rows.shape[-1] <= MAX_ROW_SIZE


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def launcher(x: torch.Tensor):
    """Triton launches on the current device: make it x's."""
    return torch.cuda.device(x.device) if x.is_cuda else nullcontext()


def l2_normalised(rows: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """rows / sqrt(sum rows² + eps) over the last dimension, in float32, returned in the rows' dtype, in one launch
    of ``l2norm_kernel()``. rows [N, D] contiguous -> [N, D]."""
    count, width = rows.shape
    out = torch.empty_like(rows)
    if count:
        with launcher(rows):
            l2norm_kernel()[lambda meta: (-(-count // meta["BT"]),)](
                x=rows, y=out, rstd=torch.empty(count, dtype=torch.float32, device=rows.device), eps=eps, T=count,
                D=width, BD=next_power_of_2(width), NB=1,
            )
    return out


def gated_rms_normalised(
    rows: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, activation: str
) -> torch.Tensor:
    """weight · rows / rms(rows) · act(gate) (act: one of ``GATE_ACTIVATIONS``), in float32 until the end, returned in
    the rows' dtype, in one launch of ``gated_norm_kernel()``. rows, gate [N, D] contiguous, weight [D] -> [N, D]."""
    if activation not in GATE_ACTIVATIONS:
        raise ValueError(f"fla's gated norm applies {', '.join(GATE_ACTIVATIONS)}, not {activation!r}")
    count, width = rows.shape
    out = torch.empty_like(rows)
    if count:
        with launcher(rows):
            gated_norm_kernel()[lambda meta: (-(-count // meta["BT"]),)](
                x=rows, g=gate, y=out, w=weight, b=None, residual=None, residual_out=None, mean=None,
                rstd=torch.empty(count, dtype=torch.float32, device=rows.device), eps=eps, T=count, D=width,
                BD=next_power_of_2(width), NB=1, ACTIVATION=activation, IS_RMS_NORM=True,
            )
    return out
