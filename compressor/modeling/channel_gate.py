"""KDA's per-channel log decay in one launch, written head-major; and its chunk-local cumulative sums, the form fla's
chunked KDA and gated-delta kernels read.

Shipped inside KDA and Gated DeltaNet output folders (imports only torch and, where installed, triton). The packed
layout (``packed_heads``) takes the decay g [B, T, H, K] as a view when it lies in head-major memory; PyTorch computes
-exp(A_log) · softplus(f + dt_bias) in three launches over float32 temporaries of that size (Kimi Linear's stock forget
gate in about ten), where fla's stock KDA layer fuses the gate into its chunked sum (a kernel that reads ``A_log`` and
``dt_bias`` by head index, which the packed layout does not have). ``channel_gate`` launches one Triton kernel that
reads f token-major in its own dtype and writes g head-major in float32. ``chunk_cumulative`` runs the same kernel
without the gate and with the chunked sum: g's running sums within each chunk of ``CHUNK_SIZE`` tokens, times log2(e),
as fla's ``chunk_local_cumsum`` computes them for its chunked KDA, but with no batch or head count as a compile-time
constant (fla's takes both, and would compile once per head count of a pruned model's layers); its programs split the
channels, as fla's do. ``gated_chunk_cumulative`` computes the gate and its chunked sum in the same programs, as fla's
gate-fused sum does, and never writes the decay itself: a recurrence handed the gate (``DecayGate``) instead of the
decay calls it on its chunked path. Neither the head count, the batch nor the length is a compile-time constant: one
compilation per key head size, gate form and layout divisibility, one fixed configuration, no autotuning. The softplus
is PyTorch's, log1p(exp(x)) up to 20 and x above, where fla's and Kimi Linear's log(1 + exp(x)) lose the small values
of very negative x: log1p's series where exp(x) < 1/16, log2(1 + exp(x)) · ln 2 above it, the log from the GPU's
approximate instruction on NVIDIA GPUs (libdevice's takes about twenty; its error there stays below 1e-5 of the
value); the bounded gate is fla's, lower_bound · sigmoid(exp(A_log) · (f + dt_bias)).

Shapes: f [B, T, H, K] with unit channel stride; dt_bias [H, K] and rate = exp(A_log) [H], contiguous, float32;
g [B, T, H, K] float32 with unit channel stride; both return [B, T, H, K] float32, head-major (``.transpose(1, 2)``
contiguous); ``gated_chunk_cumulative`` for r value heads per key head [B, T, H / r, r, K] in fla's layout for them
(``values_per_key``). CPU tensors only under Triton's interpreter.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .fla_decode_step import launching_on, next_power_of_2
from .packed_heads import CHUNK_SIZE
from .shared_keys import checked_ratio, interleaved_shape

try:  # KDA folders run on fla, which needs triton; without it the caller computes in PyTorch
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BLOCK_TOKENS = 32
"""Tokens per program of ``channel_gate``: with 4 warps and K = 128, 32 values per thread (the chunk sums' programs
take one chunk each)."""
SUM_BLOCK_CHANNELS = 32
"""Channels per program where the kernel sums by chunk (a program sums CHUNK_SIZE x SUM_BLOCK_CHANNELS values), as
fla's gate-fused cumulative sum splits the channels (``scripts/tune_project_kernels.py`` times the choices, for the
gate with its sums; the sums alone take the same)."""
SUM_NUM_WARPS = 1
"""Warps per program where the kernel sums by chunk."""
LOG2_E = 1.4426950216
"""log2(e) as fla writes it (``RCP_LN2``): its chunked kernels take the decay's sums in base 2."""
NUM_WARPS = 4
MAX_KEY_DIM = 256
"""The widest key heads ``runs`` lets through (a program holds BLOCK_TOKENS x K values, or CHUNK_SIZE x K for the
chunk sums)."""


class DecayGate(NamedTuple):
    """The parameters of the gate that makes KDA's log decay from its input f, ``channel_gate``'s: bias [H, K] and
    rate [H] (or [H, 1]), contiguous, float32; lower_bound for the bounded gate, else None."""

    bias: torch.Tensor
    rate: torch.Tensor
    lower_bound: float | None


def runs(x: torch.Tensor, width: int) -> bool:
    """Whether ``channel_gate`` and ``chunk_cumulative`` run now for key heads of ``width`` channels computed from x
    (any tensor on their device): x on a GPU, outside autograd (the kernel has no backward), width ≤ ``MAX_KEY_DIM``,
    triton importable."""
    return triton is not None and x.is_cuda and not torch.is_grad_enabled() and width <= MAX_KEY_DIM


def takes(f: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``channel_gate`` computes the decay of f [B, T, H, K] in ``dtype``: where it ``runs``, float32,
    contiguous f."""
    return runs(f, f.shape[-1]) and dtype == torch.float32 and f.is_contiguous()


def channel_gate(f: torch.Tensor, bias: torch.Tensor, rate: torch.Tensor, lower_bound: float | None) -> torch.Tensor:
    """-rate · softplus(f + bias), or lower_bound · sigmoid(rate · (f + bias)) where ``lower_bound`` is given, per
    value head h and key channel: f [B, T, H, K] (unit channel stride), bias [H, K], rate [H] -> [B, T, H, K]
    float32, head-major."""
    _check(f, bias, rate)
    return _launch(f, bias, rate, lower_bound, gated=True, cumulative=False)


def gated_chunk_cumulative(f: torch.Tensor, gate: DecayGate, values_per_key: int = 1) -> torch.Tensor:
    """``chunk_cumulative(channel_gate(f, *gate))`` in one launch, the decay never written: f [B, T, H, K] (unit
    channel stride) -> [B, T, H, K] float32, head-major; with ``values_per_key`` = r > 1 (dividing H), [B, T, H / r,
    r, K] laid out as fla lays out r value heads that share a key head (``.transpose(1, 2)`` contiguous: the r heads
    interleaved token by token), head h at [:, :, h // r, h % r]."""
    _check(f, gate.bias, gate.rate)
    return _launch(f, gate.bias, gate.rate, gate.lower_bound, gated=True, cumulative=True,
                   values_per_key=values_per_key)


def _check(f: torch.Tensor, bias: torch.Tensor, rate: torch.Tensor) -> None:
    """Refuse a gate's input and parameters that the kernel does not read."""
    heads, width = f.shape[2:]
    if bias.shape != (heads, width) or rate.numel() != heads or not (bias.is_contiguous() and rate.is_contiguous()):
        raise ValueError(f"channel_gate takes a contiguous bias [{heads}, {width}] and rate [{heads}]")
    if f.stride(-1) != 1:
        raise ValueError("channel_gate takes f with unit channel stride")


def chunk_cumulative(g: torch.Tensor) -> torch.Tensor:
    """The running sums of g [B, T, H, K] (float32, unit channel stride unless K = 1, any order of the other
    dimensions) over the tokens of each chunk of ``CHUNK_SIZE`` (restarting at every multiple of it), times
    ``LOG2_E``: [B, T, H, K] float32, head-major."""
    if g.dtype != torch.float32 or (g.shape[-1] > 1 and g.stride(-1) != 1):
        raise ValueError("chunk_cumulative takes float32 g with unit channel stride")
    return _launch(g, g, g, None, gated=False, cumulative=True)


def _launch(x: torch.Tensor, bias: torch.Tensor, rate: torch.Tensor, lower_bound: float | None,
            gated: bool, cumulative: bool, values_per_key: int = 1) -> torch.Tensor:
    """One launch of ``channel_gate_kernel`` over x [B, T, H, K]: the gate alone, ``BLOCK_TOKENS`` tokens and every
    channel a program; the running sums (of x, or of its gate), a chunk of ``CHUNK_SIZE`` tokens and
    ``SUM_BLOCK_CHANNELS`` channels. Written head-major, or with ``values_per_key`` = r > 1 as [B, H / r, T, r, K]."""
    batch, length, heads, width = x.shape
    ratio = checked_ratio(heads, values_per_key, "channel_gate")
    tokens, channels, warps = ((CHUNK_SIZE, min(SUM_BLOCK_CHANNELS, next_power_of_2(width)), SUM_NUM_WARPS)
                               if cumulative else (BLOCK_TOKENS, next_power_of_2(width), NUM_WARPS))
    if x.stride(1) * tokens >= 2**31:
        raise ValueError(f"channel_gate takes a token stride below 2**31 / {tokens}, not {x.stride(1)}")
    out = torch.empty(batch, *interleaved_shape(heads, length, ratio), width, dtype=torch.float32, device=x.device)
    if out.numel():
        chunks, channel_blocks = -(-length // tokens), -(-width // channels)
        with launching_on(x):
            channel_gate_kernel[(channel_blocks * chunks * batch * heads,)](
                x, bias, rate, out, 0.0 if lower_bound is None else float(lower_bound), LOG2_E, length, heads, chunks,
                channel_blocks, *(x.stride(i) for i in range(3)), ratio, K=width, BT=tokens, BK=channels,
                GATED=gated, BOUNDED=lower_bound is not None, CUMULATIVE=cumulative,
                FAST_LOG=x.device.type == "cuda" and torch.version.hip is None, num_warps=warps,
            )
    return out.transpose(1, 2)  # [B, T, H, K] or [B, T, H / r, r, K]


if triton is not None:
    from triton.language.extra import libdevice

    from .shared_keys import interleaved_row

    @triton.jit(do_not_specialize=["T", "H", "NT", "NK", "R"])
    def channel_gate_kernel(f, bias, rate, out, lower_bound, scale, T, H, NT, NK, s_b, s_t, s_h, R, K: tl.constexpr,
                            BT: tl.constexpr, BK: tl.constexpr, GATED: tl.constexpr, BOUNDED: tl.constexpr,
                            CUMULATIVE: tl.constexpr, FAST_LOG: tl.constexpr):
        """One program per BT tokens and BK channels (one of NK blocks) of one (sequence, head): f read at
        b·s_b + t·s_t + h·s_h + k, the result written at ((i // R · T + t)·R + i % R)·K + k, i = b·H + h (R heads
        interleaved token by token; head-major for R = 1); with CUMULATIVE, its running sum over the program's
        tokens, times ``scale``. Offsets within the program are int32 (BT · s_t and BT · R · K below 2**31), its
        base int64; FAST_LOG takes log2 from the GPU's approximate instruction (not under Triton's interpreter)."""
        i_k = tl.program_id(0) % NK  # the program's coordinates in int32 (the grid's size is), its base in int64
        i_bht = tl.program_id(0) // NK
        i_bh, i_t = i_bht // NT, i_bht % NT
        i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H
        t_0 = (i_t * BT).to(tl.int64)
        o_t = tl.arange(0, BT)
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        mask = (i_t * BT + o_t < T)[:, None] & m_k[None, :]
        y = tl.load(f + i_b * s_b + t_0 * s_t + i_h.to(tl.int64) * s_h + o_t[:, None] * s_t + o_k[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        if GATED:
            x = y + tl.load(bias + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)[None, :]
            a = tl.load(rate + i_h).to(tl.float32)
            if BOUNDED:
                y = lower_bound * tl.sigmoid(a * x)
            else:  # softplus as PyTorch's, log1p(exp(x)): log1p's series below 1/16 (no log(1 + e) that rounds e away)
                e = tl.exp(tl.minimum(x, 20.0, propagate_nan=tl.PropagateNan.ALL))
                series = e * (1.0 - e * (0.5 - e * (0.33333333 - e * (0.25 - e * 0.2))))
                if FAST_LOG:  # the GPU's lg2.approx, one instruction where libdevice's log2 takes about twenty
                    log_u = libdevice.fast_log2f(1.0 + e)
                else:
                    log_u = tl.log2(1.0 + e)
                y = -a * tl.where(x > 20.0, x, tl.where(e < 0.0625, series, log_u * 0.69314718056))
        if CUMULATIVE:  # rows past T follow the last token: they change no sum of the tokens before them
            y = tl.cumsum(y, axis=0) * scale
        row_0 = interleaved_row(i_bh, t_0, T, R)
        tl.store(out + row_0 * K + (o_t * R * K)[:, None] + o_k[None, :], y, mask=mask)
