"""KDA's per-channel log decay in one launch, written head-major.

Shipped inside KDA output folders, fla's and Kimi Linear's (imports only torch and, where installed, triton). The
packed layout (``packed_heads``) takes the decay g [B, T, H, K] as a view when it lies in head-major memory; PyTorch
computes -exp(A_log) · softplus(f + dt_bias) in three launches over float32 temporaries of that size (Kimi Linear's
stock forget gate in about ten), where fla's stock KDA layer fuses the gate into its chunked sum (a kernel that
reads ``A_log`` and ``dt_bias`` by head index, which the packed layout does not have). ``channel_gate`` launches one
Triton kernel that reads f token-major in its own dtype and writes g head-major in float32. Neither the head count,
the batch nor the length is a compile-time constant: one compilation per key head size and gate form, one fixed
configuration, no autotuning. The softplus is PyTorch's (log1p(exp(x)) up to 20, x above: fla's and Kimi Linear's
log(1 + exp(x)) lose the small values of very negative x), the bounded gate fla's, lower_bound · sigmoid(exp(A_log)
· (f + dt_bias)).

Shapes: f [B, T, H, K] contiguous; dt_bias [H, K] and rate = exp(A_log) [H], contiguous, float32; returns
[B, T, H, K] float32, head-major (``.transpose(1, 2)`` contiguous). CPU tensors only under Triton's interpreter.
"""

from __future__ import annotations

import torch

from .fla_decode_step import launching_on, next_power_of_2

try:  # KDA folders run on fla, which needs triton; without it the caller computes in PyTorch
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BLOCK_TOKENS = 32
"""Tokens per program: with 4 warps and K = 128, 32 values per thread."""
NUM_WARPS = 4
MAX_KEY_DIM = 256
"""The widest key heads ``takes`` lets through (a program holds BLOCK_TOKENS x K values)."""


def runs(x: torch.Tensor, width: int) -> bool:
    """Whether ``channel_gate`` runs now for key heads of ``width`` channels computed from x (any tensor on their
    device): x on a GPU, outside autograd (the kernel has no backward), width ≤ ``MAX_KEY_DIM``, triton importable."""
    return triton is not None and x.is_cuda and not torch.is_grad_enabled() and width <= MAX_KEY_DIM


def takes(f: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``channel_gate`` computes the decay of f [B, T, H, K] in ``dtype``: where it ``runs``, float32,
    contiguous f."""
    return runs(f, f.shape[-1]) and dtype == torch.float32 and f.is_contiguous()


def channel_gate(f: torch.Tensor, bias: torch.Tensor, rate: torch.Tensor, lower_bound: float | None) -> torch.Tensor:
    """-rate · softplus(f + bias), or lower_bound · sigmoid(rate · (f + bias)) where ``lower_bound`` is given, per
    value head h and key channel: f [B, T, H, K], bias [H, K], rate [H] -> [B, T, H, K] float32, head-major."""
    batch, length, heads, width = f.shape
    if bias.shape != (heads, width) or rate.numel() != heads or not (bias.is_contiguous() and rate.is_contiguous()):
        raise ValueError(f"channel_gate takes a contiguous bias [{heads}, {width}] and rate [{heads}]")
    out = torch.empty(batch, heads, length, width, dtype=torch.float32, device=f.device)
    if out.numel():
        chunks = -(-length // BLOCK_TOKENS)
        with launching_on(f):
            channel_gate_kernel[(chunks * batch * heads,)](
                f, bias, rate, out, 0.0 if lower_bound is None else float(lower_bound), length, heads, chunks,
                K=width, BT=BLOCK_TOKENS, BK=next_power_of_2(width), BOUNDED=lower_bound is not None,
                num_warps=NUM_WARPS,
            )
    return out.transpose(1, 2)


if triton is not None:

    @triton.jit(do_not_specialize=["T", "H", "NT"])
    def channel_gate_kernel(f, bias, rate, out, lower_bound, T, H, NT, K: tl.constexpr, BT: tl.constexpr,
                            BK: tl.constexpr, BOUNDED: tl.constexpr):
        """One program per BT tokens of one (sequence, head): f read at ((b·T + t)·H + h)·K + k, g written at
        ((b·H + h)·T + t)·K + k."""
        i_bh = tl.program_id(0).to(tl.int64) // NT
        i_t = tl.program_id(0).to(tl.int64) % NT
        i_b, i_h = i_bh // H, i_bh % H
        o_t = i_t * BT + tl.arange(0, BT)
        o_k = tl.arange(0, BK)
        m_k = o_k < K
        mask = (o_t < T)[:, None] & m_k[None, :]
        x = tl.load(f + ((i_b * T + o_t[:, None]) * H + i_h) * K + o_k[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32) + tl.load(bias + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)[None, :]
        a = tl.load(rate + i_h).to(tl.float32)
        if BOUNDED:
            y = lower_bound * tl.sigmoid(a * x)
        else:  # softplus as PyTorch's: log1p(exp(x)) (Goldberg's form of log1p: no log(1 + e) that rounds e away)
            e = tl.exp(tl.minimum(x, 20.0, propagate_nan=tl.PropagateNan.ALL))
            u = 1.0 + e
            y = -a * tl.where(x > 20.0, x, tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0))))
        tl.store(out + (i_bh * T + o_t[:, None]) * K + o_k[None, :], y, mask=mask)
