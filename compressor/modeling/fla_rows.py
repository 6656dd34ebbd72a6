"""fla's row kernels (L2 norm, gated RMS norm) launched once on any number of rows, compiled once.

Shipped inside output folders (imports only torch and ``fla_decode_step``'s launch helpers; fla and triton are
looked up at the first call). fla's public
``l2norm_fwd`` and ``rms_norm_gated`` hand their Triton kernels ⌈rows / 65,536⌉ (``NB``) as a compile-time
constant that only selects an autotuning entry: layers that kept different numbers of heads would compile and tune
them once per distinct value. ``NB`` appears nowhere else in the kernels (``fla_kernel`` checks), so the functions
here launch them with ``NB = 1`` on every input: one launch per call, none of the wrappers fla puts around its
public functions for autograd and backend dispatch (host time a small model's prefill spends several times per
layer). Both kernels are launched beneath fla's autotuner (and heuristics) with one of the configurations it tunes
among (``L2NORM_CONFIG``, ``GATED_NORM_CONFIG``, chosen with ``scripts/tune_row_kernels.py``): with an empty Triton
cache, one compilation each instead of 25 and 9, and no autotuning run. ``l2norm_kernel()`` or
``gated_norm_kernel()`` is None where fla differs from the version this code was written for (0.6), and callers
compute in PyTorch.

Shapes: rows [N, D], contiguous, D ≤ 512; outputs [N, D] in the input's dtype. CPU tensors only under Triton's
interpreter.
"""

from __future__ import annotations

import importlib
import inspect
import re
from functools import lru_cache

import torch

from .fla_decode_step import launching_on, next_power_of_2

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

L2NORM_CONFIG = dict(BT=32, num_warps=16)
"""The configuration ``l2_normalised`` launches fla's l2norm kernel with: of the 25 fla tunes among, the one whose
largest ratio to the best configuration over the sizes measured was smallest
(``scripts/results/tune_row_kernels_h200.log``)."""

GATED_NORM_CONFIG = dict(BT=16, num_warps=8)
"""The configuration ``gated_rms_normalised`` launches fla's gated norm kernel with, chosen as ``L2NORM_CONFIG`` among
fla's 9 (``scripts/results/tune_row_kernels_h200_gated_norm.log``)."""


def fla_kernel(module_name: str, kernel_name: str, arguments: tuple[str, ...]):
    """The function beneath the autotuner and heuristics of fla's Triton kernel ``module_name.kernel_name`` (launched
    with a configuration of the caller's) if its arguments are ``arguments`` and its source names ``NB`` only among
    them; else None."""
    try:
        module = importlib.import_module(module_name)
        from triton.runtime.autotuner import Autotuner, Heuristics
    except Exception:  # no fla, or fla without triton
        return None
    function = getattr(module, kernel_name, None)
    while isinstance(function, (Autotuner, Heuristics)):
        function = function.fn
    if tuple(getattr(function, "arg_names", ())) != arguments or not names_nb_once(function):
        return None
    return function


def names_nb_once(function) -> bool:
    """Whether the source of a Triton function (decorators left out) names ``NB`` once: among its arguments."""
    try:
        source = inspect.getsource(function.fn)
    except (AttributeError, OSError, TypeError):  # no Python function beneath, or its source is not on disk
        return False
    definition = re.search(r"^\s*def\s", source, re.MULTILINE)
    return definition is not None and len(re.findall(r"\bNB\b", source[definition.start():])) == 1


@lru_cache(maxsize=1)
def l2norm_kernel():
    """The function beneath fla's autotuner for ``l2norm_fwd_kernel`` if its arguments are ``L2NORM_ARGUMENTS``,
    else None."""
    return fla_kernel("fla.modules.norm.l2norm", "l2norm_fwd_kernel", L2NORM_ARGUMENTS)


@lru_cache(maxsize=1)
def gated_norm_kernel():
    """The function beneath fla's heuristics and autotuner for ``layer_norm_gated_fwd_kernel`` if its arguments are
    ``GATED_NORM_ARGUMENTS``, else None."""
    return fla_kernel("fla.modules.norm.fused_norm_gate", "layer_norm_gated_fwd_kernel", GATED_NORM_ARGUMENTS)


def takes(rows: torch.Tensor) -> bool:
    """Whether the row kernels take ``rows`` [N, D]: on a GPU, outside autograd (they have no backward), D ≤ 512."""
    return rows.is_cuda and not torch.is_grad_enabled() and rows.shape[-1] <= MAX_ROW_SIZE


def l2_normalised(rows: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """rows / sqrt(sum rows² + eps) over the last dimension, in float32, returned in the rows' dtype, in one launch
    of ``l2norm_kernel()``. rows [N, D] contiguous -> [N, D]."""
    if not rows.is_contiguous():
        raise ValueError("l2_normalised takes contiguous rows")
    count, width = rows.shape
    out = torch.empty_like(rows)
    if count:
        with launching_on(rows):
            l2norm_kernel()[(-(-count // L2NORM_CONFIG["BT"]),)](
                x=rows, y=out, rstd=torch.empty(count, dtype=torch.float32, device=rows.device), eps=eps, T=count,
                D=width, BD=next_power_of_2(width), NB=1, **L2NORM_CONFIG,
            )
    return out


def gated_rms_normalised(
    rows: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, activation: str
) -> torch.Tensor:
    """weight · rows / rms(rows) · act(gate) (act: one of ``GATE_ACTIVATIONS``), in float32 until the end, returned in
    the rows' dtype, in one launch of ``gated_norm_kernel()``. rows, gate [N, D], weight [D], contiguous -> [N, D]."""
    if activation not in GATE_ACTIVATIONS:
        raise ValueError(f"fla's gated norm applies {', '.join(GATE_ACTIVATIONS)}, not {activation!r}")
    if not (rows.is_contiguous() and gate.is_contiguous() and gate.shape == rows.shape
            and weight.shape == rows.shape[-1:] and weight.is_contiguous()):
        raise ValueError("gated_rms_normalised takes contiguous rows and gates [N, D] and a contiguous weight [D]")
    count, width = rows.shape
    out = torch.empty_like(rows)
    if count:
        with launching_on(rows):
            gated_norm_kernel()[(-(-count // GATED_NORM_CONFIG["BT"]),)](
                x=rows, g=gate, y=out, w=weight, b=None, residual=None, residual_out=None, mean=None,
                rstd=torch.empty(count, dtype=torch.float32, device=rows.device), eps=eps, T=count, D=width,
                BD=next_power_of_2(width), NB=1, ACTIVATION=activation, IS_RMS_NORM=True, STORE_RESIDUAL_OUT=False,
                HAS_RESIDUAL=False, HAS_WEIGHT=True, HAS_BIAS=False, **GATED_NORM_CONFIG,
            )
    return out
