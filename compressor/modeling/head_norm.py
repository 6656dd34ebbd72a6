"""The output norm (RMS, optionally gated) of per-head rows read where the recurrence left them, in one launch.

Shipped inside output folders (imports only torch and, where installed, triton). The chunked recurrences return their
output head-major (``packed_heads.py``: every head a sequence of its own), while the output norm's gate and the
output projection are token-major. fla's norm kernels read contiguous rows, so the output would first be copied into
token order: one more launch and pass over memory in every layer. ``rms_normalised`` launches one Triton kernel that
reads each row of x through x's strides (and of the gate through the gate's) and writes the normalised rows in token
order, computed as fla's kernels compute them: y = x · rstd · weight with rstd = 1 / sqrt(mean(x²) + eps), then
y · g · sigmoid(g) (swish, silu) or y · sigmoid(g), in float32, rounded to x's dtype at the end. Neither the head
count, the batch nor the length is compiled in; the configuration is the one measured for fla's gated norm kernel,
whose loop is the same (``fla_rows.GATED_NORM_CONFIG``: ``BLOCK_ROWS``, ``NUM_WARPS``), and nothing autotunes.

Shapes: x, gate [B, T, H, D] (any strides but a contiguous last dimension), weight [D] -> [B, T, H, D], contiguous;
or x, gate [B, T, H_k, r, D], the output of value heads that share key heads as fla lays it out (r heads per key head
interleaved token by token) -> [B, T, H_k, r, D], contiguous. CPU tensors only under Triton's interpreter.
"""

from __future__ import annotations

import torch

from .fla_decode_step import launching_on, next_power_of_2
from .fla_rows import GATE_ACTIVATIONS, GATED_NORM_CONFIG, MAX_ROW_SIZE

try:  # folders run where triton is absent too: the callers then normalise through fla's modules or PyTorch
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BLOCK_ROWS = GATED_NORM_CONFIG["BT"]
"""Rows per program."""
NUM_WARPS = GATED_NORM_CONFIG["num_warps"]
MAX_ROWS = 2**31 - 1024
"""The kernel counts rows in int32, a last program's past the end included (``BLOCK_ROWS`` ≤ 1024)."""


def rows_of(x: torch.Tensor) -> int:
    """The rows of D elements that x [..., D] holds."""
    return x.numel() // max(x.shape[-1], 1)


def takes(x: torch.Tensor, gate: torch.Tensor | None = None) -> bool:
    """Whether ``rms_normalised`` takes x (and gate) [B, T, H, D] or [B, T, H_k, r, D]: on a GPU, outside autograd
    (the kernel has no backward), fewer than ``MAX_ROWS`` rows of at most ``MAX_ROW_SIZE`` contiguous elements that
    are not in token order already (contiguous rows go to fla's kernels, which read them as they lie), triton
    importable."""
    return (triton is not None and x.is_cuda and not torch.is_grad_enabled() and x.dim() in (4, 5)
            and rows_of(x) < MAX_ROWS
            and x.shape[-1] <= MAX_ROW_SIZE and x.stride(-1) == 1 and not x.is_contiguous()
            and (gate is None or (gate.shape == x.shape and gate.stride(-1) == 1)))


def rms_normalised(x: torch.Tensor, weight: torch.Tensor, eps: float, gate: torch.Tensor | None = None,
                   activation: str | None = None) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) · weight over the last dimension, times act(gate) where a gate is given (act: one of
    ``GATE_ACTIVATIONS``), in float32 until the end, in x's dtype: x, gate [B, T, H, D] or [B, T, H_k, r, D] (last
    dimension contiguous), weight [D] contiguous -> x's shape, contiguous, in one launch."""
    if x.dim() not in (4, 5) or x.stride(-1) != 1:
        raise ValueError("rms_normalised takes x [B, T, H, D] or [B, T, H_k, r, D] with a contiguous last dimension")
    if gate is not None and (gate.shape != x.shape or gate.stride(-1) != 1 or activation not in GATE_ACTIVATIONS):
        raise ValueError(f"rms_normalised takes a gate of x's shape, contiguous rows and one of {GATE_ACTIVATIONS}")
    if weight.shape != x.shape[-1:] or not weight.is_contiguous():
        raise ValueError("rms_normalised takes a contiguous weight [D]")
    if rows_of(x) >= MAX_ROWS:
        raise ValueError(f"rms_normalised takes fewer than {MAX_ROWS} rows")
    batch, length, width = x.shape[0], x.shape[1], x.shape[-1]
    ratio = x.shape[3] if x.dim() == 5 else 1
    heads = x.shape[2] * ratio
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = batch * length * heads
    if rows:
        gated = x if gate is None else gate
        strides = [(*t.stride()[:3], t.stride(3) if t.dim() == 5 else 0) for t in (x, gated)]
        with launching_on(x):
            head_norm_kernel[(-(-rows // BLOCK_ROWS),)](
                x, gated, weight, out, eps, rows, length, heads, ratio, *strides[0], *strides[1], D=width,
                BD=next_power_of_2(width), BR=BLOCK_ROWS, ACTIVATION=activation if gate is not None else "",
                num_warps=NUM_WARPS,
            )
    return out


if triton is not None:

    @triton.jit(do_not_specialize=["N", "T", "H", "R"])
    def head_norm_kernel(x, g, w, y, eps, N, T, H, R, sx_b, sx_t, sx_h, sx_r, sg_b, sg_t, sg_h, sg_r,
                         D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, ACTIVATION: tl.constexpr):
        """One program per BR rows in token order, row r = (b·T + t)·H + h, head h = i·R + j (R heads per key head;
        R = 1 for 4-D x): x read at b·sx_b + t·sx_t + i·sx_h + j·sx_r, the gate likewise through its strides (unread
        without ``ACTIVATION``), y written at r·D."""
        o_r = tl.program_id(0) * BR + tl.arange(0, BR)  # int32 (N < 2**31): 64-bit division is a long subroutine
        i_h, i_bt = o_r % H, o_r // H
        i_b, i_t = (i_bt // T).to(tl.int64), (i_bt % T).to(tl.int64)
        i_k, i_j = (i_h // R).to(tl.int64), (i_h % R).to(tl.int64)
        o_d = tl.arange(0, BD)
        m_d = o_d < D
        mask = (o_r < N)[:, None] & m_d[None, :]
        b_x = tl.load(x + (i_b * sx_b + i_t * sx_t + i_k * sx_h + i_j * sx_r)[:, None] + o_d[None, :], mask=mask,
                      other=0.0).to(tl.float32)
        b_rstd = 1 / tl.sqrt(tl.sum(b_x * b_x, axis=1) / D + eps)
        b_w = tl.load(w + o_d, mask=m_d).to(tl.float32)
        b_y = b_x * b_rstd[:, None] * b_w[None, :]
        if ACTIVATION != "":
            b_g = tl.load(g + (i_b * sg_b + i_t * sg_t + i_k * sg_h + i_j * sg_r)[:, None] + o_d[None, :], mask=mask,
                          other=0.0).to(tl.float32)
            if ACTIVATION == "sigmoid":
                b_y = b_y * tl.sigmoid(b_g)
            else:
                b_y = b_y * b_g * tl.sigmoid(b_g)
        tl.store(y + o_r.to(tl.int64)[:, None] * D + o_d[None, :], b_y.to(y.dtype.element_ty), mask=mask)
