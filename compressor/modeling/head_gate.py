"""Gated DeltaNet's per-head log decay and write strength in one launch, written head-major.

Shipped inside the output folders of every Gated DeltaNet family (imports only torch and, where installed, triton).
The packed layout (``packed_heads``) takes g and beta [B, T, H] as views when they lie in head-major memory. PyTorch
computes g = -exp(A_log) · softplus(a + dt_bias) in three launches and beta = sigmoid(b) in a fourth (a fifth scales
beta where negative eigenvalues are allowed), where fla's stock layer fuses both into its chunked kernels (which read
``A_log`` and ``dt_bias`` by head index, which the packed layout does not have). ``head_gates`` launches one Triton
kernel that reads a and b token-major in their own dtype (views of one fused projection too: tokens ``a.stride(1)``
and ``b.stride(1)`` apart) and writes g in float32 and beta in b's dtype (transformers' layers round sigmoid(b) to
it) or in float32 (fla's layers apply the sigmoid in float32 inside their kernels), head-major; ``write_strengths``
writes beta alone, for KDA, whose decay has a kernel of its own. Neither the head count, the batch, the length nor a
stride is a compile-time constant: one compilation per dtype and kind, one fixed configuration, no autotuning. The
softplus is PyTorch's form (log1p(exp(x)) up to 20, x above; NaN stays NaN), the sigmoid computed in float32 and
rounded once, as PyTorch's (equal to a few float32 ulps: Triton's exp is not PyTorch's).

Shapes: a, b [B, T, H] (unit stride over heads, batch entries T tokens apart); dt_bias and scale = -exp(A_log) [H],
contiguous, float32; returns (g [B, T, H] float32, beta [B, T, H] in b's dtype or ``beta_dtype``), both head-major
(``.transpose(1, 2)`` contiguous), or for r value heads per key head both [B, T, H / r, r] in fla's layout for them
(``values_per_key``). CPU tensors only under Triton's interpreter.
"""

from __future__ import annotations

import torch

from .fla_decode_step import launching_on
from .shared_keys import checked_ratio, interleaved_shape

try:  # Gated DeltaNet folders run on fla or PyTorch; without triton the caller computes in PyTorch
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BLOCK_TOKENS = 256
"""Tokens per program: with 4 warps, two values per thread."""
NUM_WARPS = 4
INPUT_DTYPES = {torch.float16, torch.bfloat16, torch.float32}


def rows_of(x: torch.Tensor) -> bool:
    """Whether x [B, T, H] has unit stride over heads and its batch entries T tokens apart (the kernel's addressing)."""
    if x.dim() != 3:
        return False
    if not x.numel():
        return True  # nothing is read
    return (x.shape[2] <= 1 or x.stride(2) == 1) and (x.shape[0] <= 1 or x.stride(0) == x.shape[1] * x.stride(1))


def takes_beta(b: torch.Tensor) -> bool:
    """Whether ``write_strengths`` takes b: on a GPU in a 16- or 32-bit float, outside autograd (the kernel has no
    backward), triton importable, laid out as ``rows_of`` reads it."""
    return (triton is not None and b.is_cuda and not torch.is_grad_enabled() and b.dtype in INPUT_DTYPES
            and rows_of(b))


def takes(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``head_gates`` computes g in ``dtype`` from a and b: float32, each as ``takes_beta`` takes it, on one
    device and of one shape."""
    return (dtype == torch.float32 and a.shape == b.shape and b.device == a.device and takes_beta(a)
            and takes_beta(b))


def head_gates(
    a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor, beta_scale: float = 1.0,
    values_per_key: int = 1, beta_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(g = scale · softplus(a + bias) in float32, beta = beta_scale · sigmoid(b) in ``beta_dtype``, by default b's),
    per value head h: a, b [B, T, H], bias and scale [H] -> two [B, T, H], head-major; with ``values_per_key`` = r > 1
    (dividing H), two [B, T, H / r, r] laid out as fla lays out r value heads that share a key head (``.transpose(1, 2)``
    contiguous: the r heads interleaved token by token), head h at [:, :, h // r, h % r]."""
    heads = a.shape[-1]
    if a.shape != b.shape or not rows_of(a):
        raise ValueError("head_gates takes a and b of one shape [B, T, H], unit stride over heads, batch entries T "
                         "tokens apart")
    if bias.shape != (heads,) or scale.shape != (heads,) or not (bias.is_contiguous() and scale.is_contiguous()):
        raise ValueError(f"head_gates takes a contiguous bias [{heads}] and scale [{heads}]")
    return _launch(b, beta_scale, values_per_key, beta_dtype or b.dtype, (a, bias, scale))


def write_strengths(b: torch.Tensor, beta_scale: float = 1.0, values_per_key: int = 1,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """beta = beta_scale · sigmoid(b) in ``dtype`` alone, as ``head_gates`` writes it: b [B, T, H] -> [B, T, H],
    head-major, or [B, T, H / r, r] in fla's layout for ``values_per_key`` = r > 1. One launch where PyTorch takes two
    (``sigmoid(b, out=)`` rounds to b's dtype before it casts)."""
    return _launch(b, beta_scale, values_per_key, dtype, None)[1]


def _launch(
    b: torch.Tensor, beta_scale: float, values_per_key: int, beta_dtype: torch.dtype,
    decay: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``head_gate_kernel`` over b [B, T, H] and, where given, decay = (a [B, T, H], bias [H], scale [H]): (g or
    None, beta), both head-major (or interleaved, ``values_per_key``)."""
    batch, length, heads = b.shape
    ratio = checked_ratio(heads, values_per_key, "head_gates" if decay else "write_strengths")
    if not rows_of(b):
        raise ValueError(f"{'head_gates' if decay else 'write_strengths'} takes b [B, T, H] with unit stride over "
                         "heads and batch entries T tokens apart")
    shape = (batch, *interleaved_shape(heads, length, ratio))
    beta = torch.empty(shape, dtype=beta_dtype, device=b.device)
    g = None if decay is None else torch.empty(shape, dtype=torch.float32, device=b.device)
    a, bias, scale = (b, b, b) if decay is None else decay  # unread without the decay
    if beta.numel():
        chunks = -(-length // BLOCK_TOKENS)
        with launching_on(b):
            head_gate_kernel[(chunks * batch * heads,)](
                a, b, bias, scale, beta if g is None else g, beta, float(beta_scale), length, heads, chunks,
                a.stride(1), b.stride(1), ratio, BT=BLOCK_TOKENS, DECAY=g is not None, num_warps=NUM_WARPS,
            )
    return (None if g is None else g.transpose(1, 2)), beta.transpose(1, 2)  # [B, T, H] or [B, T, H / r, r]


if triton is not None:
    from .shared_keys import interleaved_row

    @triton.jit(do_not_specialize=["beta_scale", "T", "H", "NT", "SA", "SB", "R"])
    def head_gate_kernel(a, b, bias, scale, g, beta, beta_scale, T, H, NT, SA, SB, R, BT: tl.constexpr,
                         DECAY: tl.constexpr):
        """One program per BT tokens of one (sequence, head): a read at (b·T + t)·SA + h, b at (b·T + t)·SB + h,
        g and beta written at (i // R · T + t)·R + i % R, i = b·H + h (R heads interleaved token by token;
        head-major for R = 1); without DECAY, beta alone (a, bias, scale and g unread)."""
        i_bh = tl.program_id(0).to(tl.int64) // NT
        i_t = tl.program_id(0).to(tl.int64) % NT
        i_b, i_h = i_bh // H, i_bh % H
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        o_out = interleaved_row(i_bh, o_t, T, R)
        if DECAY:
            x = tl.load(a + (i_b * T + o_t) * SA + i_h, mask=m_t, other=0.0).to(tl.float32)
            x = x + tl.load(bias + i_h).to(tl.float32)
            # softplus as PyTorch's: log1p(exp(x)) (Goldberg's form of log1p: no log(1 + e) that rounds e away)
            e = tl.exp(tl.minimum(x, 20.0, propagate_nan=tl.PropagateNan.ALL))
            u = 1.0 + e
            softplus = tl.where(x > 20.0, x, tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0))))
            tl.store(g + o_out, tl.load(scale + i_h).to(tl.float32) * softplus, mask=m_t)
        w = tl.load(b + (i_b * T + o_t) * SB + i_h, mask=m_t, other=0.0).to(tl.float32)
        tl.store(beta + o_out, (beta_scale * tl.sigmoid(w)).to(beta.dtype.element_ty), mask=m_t)
