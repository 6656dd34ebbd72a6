"""Gated DeltaNet's per-head log decay and write strength in one launch, written head-major.

Shipped inside the output folders of every Gated DeltaNet family (imports only torch and, where installed, triton).
The packed layout (``packed_heads``) takes g and beta [B, T, H] as views when they lie in head-major memory. PyTorch
computes g = -exp(A_log) · softplus(a + dt_bias) in three launches and beta = sigmoid(b) in a fourth (a fifth scales
beta where negative eigenvalues are allowed), where fla's stock layer fuses both into its chunked kernels (which read
``A_log`` and ``dt_bias`` by head index, which the packed layout does not have). ``head_gates`` launches one Triton
kernel that reads a and b token-major in their own dtype (views of one fused projection too: tokens ``a.stride(1)``
and ``b.stride(1)`` apart) and writes g in float32 and beta in b's dtype, head-major. Neither the head count, the
batch, the length nor a stride is a compile-time constant: one compilation per dtype, one fixed configuration, no
autotuning. The softplus is PyTorch's form (log1p(exp(x)) up to 20, x above; NaN stays NaN), the sigmoid computed in
float32 and rounded once, as PyTorch's (equal to a few float32 ulps: Triton's exp is not PyTorch's).

Shapes: a, b [B, T, H] (unit stride over heads, batch entries T tokens apart); dt_bias and scale = -exp(A_log) [H],
contiguous, float32; returns (g [B, T, H] float32, beta [B, T, H] in b's dtype), both head-major
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


def takes(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``head_gates`` computes g in ``dtype`` from a and b: float32, both on a GPU in 16- or 32-bit floats,
    outside autograd (the kernel has no backward), triton importable, of one shape and laid out as ``rows_of`` reads
    them."""
    return (triton is not None and a.is_cuda and b.device == a.device and not torch.is_grad_enabled()
            and dtype == torch.float32 and {a.dtype, b.dtype} <= INPUT_DTYPES and a.shape == b.shape
            and rows_of(a) and rows_of(b))


def head_gates(
    a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor, beta_scale: float = 1.0,
    values_per_key: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(g = scale · softplus(a + bias) in float32, beta = beta_scale · sigmoid(b) in b's dtype), per value head h:
    a, b [B, T, H], bias and scale [H] -> two [B, T, H], head-major; with ``values_per_key`` = r > 1 (dividing H),
    two [B, T, H / r, r] laid out as fla lays out r value heads that share a key head (``.transpose(1, 2)``
    contiguous: the r heads interleaved token by token), head h at [:, :, h // r, h % r]."""
    batch, length, heads = a.shape
    ratio = checked_ratio(heads, values_per_key, "head_gates")
    if a.shape != b.shape or not (rows_of(a) and rows_of(b)):
        raise ValueError("head_gates takes a and b of one shape [B, T, H], unit stride over heads, batch entries T "
                         "tokens apart")
    if bias.shape != (heads,) or scale.shape != (heads,) or not (bias.is_contiguous() and scale.is_contiguous()):
        raise ValueError(f"head_gates takes a contiguous bias [{heads}] and scale [{heads}]")
    shape = (batch, *interleaved_shape(heads, length, ratio))
    g = torch.empty(shape, dtype=torch.float32, device=a.device)
    beta = torch.empty(shape, dtype=b.dtype, device=b.device)
    if g.numel():
        chunks = -(-length // BLOCK_TOKENS)
        with launching_on(a):
            head_gate_kernel[(chunks * batch * heads,)](
                a, b, bias, scale, g, beta, float(beta_scale), length, heads, chunks, a.stride(1), b.stride(1), ratio,
                BT=BLOCK_TOKENS, num_warps=NUM_WARPS,
            )
    return g.transpose(1, 2), beta.transpose(1, 2)  # [B, T, H] or [B, T, H / r, r]


if triton is not None:
    from .shared_keys import interleaved_row

    @triton.jit(do_not_specialize=["beta_scale", "T", "H", "NT", "SA", "SB", "R"])
    def head_gate_kernel(a, b, bias, scale, g, beta, beta_scale, T, H, NT, SA, SB, R, BT: tl.constexpr):
        """One program per BT tokens of one (sequence, head): a read at (b·T + t)·SA + h, b at (b·T + t)·SB + h,
        g and beta written at (i // R · T + t)·R + i % R, i = b·H + h (R heads interleaved token by token;
        head-major for R = 1)."""
        i_bh = tl.program_id(0).to(tl.int64) // NT
        i_t = tl.program_id(0).to(tl.int64) % NT
        i_b, i_h = i_bh // H, i_bh % H
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        x = tl.load(a + (i_b * T + o_t) * SA + i_h, mask=m_t, other=0.0).to(tl.float32)
        x = x + tl.load(bias + i_h).to(tl.float32)
        # softplus as PyTorch's: log1p(exp(x)) (Goldberg's form of log1p: no log(1 + e) that rounds e away)
        e = tl.exp(tl.minimum(x, 20.0, propagate_nan=tl.PropagateNan.ALL))
        u = 1.0 + e
        softplus = tl.where(x > 20.0, x, tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0))))
        y = tl.load(scale + i_h).to(tl.float32) * softplus
        o_out = interleaved_row(i_bh, o_t, T, R)
        tl.store(g + o_out, y, mask=m_t)
        w = tl.load(b + (i_b * T + o_t) * SB + i_h, mask=m_t, other=0.0).to(tl.float32)
        tl.store(beta + o_out, (beta_scale * tl.sigmoid(w)).to(beta.dtype.element_ty), mask=m_t)
