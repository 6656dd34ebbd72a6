"""fla's short convolutions of the query, key and value projections, written per value head, head-major, in one
launch for queries and keys and one for values.

Shipped inside output folders of fla's families (imports only torch and, where installed, triton). fla's layers
convolve q, k and v token-major ([B, T, H·d], ``ShortConvolution``: depthwise, causal, W taps, optional bias, silu
or no activation); the recurrence then wants every value head's queries, keys and values head-major
([B, H_v, T, d]), with q and k repeated per value head that reads them. Convolving first and reordering after costs
a copy of q and k (a stacking copy, or ``head_gather``) and one of v (the packed layout's). ``convolved_heads``
convolves where it writes: each program convolves one key head's channels for a block of tokens and writes them
at a value head that reads that key head, head-major; q and k in one launch, into one block, v in another. For
recurrences that L2-normalise q and k, the launch of q and k normalises each head's row as it writes it, as fla's
l2norm kernel would after it (otherwise ``packed_heads.normalised_pair``, a launch of its own, at the value heads'
count). fla's convolution kernel takes the channel count as a compile-time constant and autotunes for each (a
pruned model would compile it once per width its layers keep); here neither the head counts, the batch, the length
nor the width is one: a compilation per head size, number of taps, dtype, form (bias, initial state, activation,
normalisation) and divisibility of the strides and addresses by 16 (Triton's specialisation), one configuration, no
autotuning. The arithmetic is fla's: the W products summed in float32 in order, then the bias, then silu,
rounded once to the input's dtype.

Shapes: one or two groups (queries, keys) of inputs x [B, T, H_k·d] (unit channel stride, the same strides), their
taps [H_k·d, W] (contiguous; ``ShortConvolution.weight`` [H_k·d, 1, W] squeezed), biases [H_k·d] or None, initial
states [B, H_k·d, W] (the last W inputs: fla's cache layout) or None; index [H_v] (the key head of each value head)
-> out [G, B, H_v, T, d], contiguous (or, for r value heads per key head in fla's layout for them, [G, B, H_v / r,
T, r, d]: ``values_per_key``), and where asked the new caches [B, H_k·d, W]. CPU tensors only under Triton's
interpreter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .fla_decode_step import launching_on, next_power_of_2
from .shared_keys import checked_ratio, interleaved_shape

try:  # fla's families run on triton; without it the caller convolves through fla's module
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BLOCK_TOKENS = 32
"""Tokens per program: with 4 warps and d = 128, 32 values per thread for the sums."""
NUM_WARPS = 4
MAX_HEAD_DIM = 256
"""The widest heads ``takes`` lets through (a program holds BLOCK_TOKENS x d values)."""
MAX_TAPS = 8
"""The most taps ``takes`` lets through (the taps' loop is unrolled)."""


def takes(x: torch.Tensor, convolutions: Sequence[torch.nn.Module], head_dims: Sequence[int]) -> bool:
    """Whether ``convolved_heads`` runs for the projections x [B, T, ·] (any one of them) through fla's
    ``ShortConvolution`` modules of queries, keys and values (``convolutions``), heads of ``head_dims`` channels:
    on a GPU, outside autograd (the kernel has no backward), triton importable, more than one token (a decode step
    keeps fla's, which writes the cache in place), one number of taps ≤ ``MAX_TAPS``, silu or no activation, one
    for queries and keys, and biases on both or neither (they share a launch), heads ≤ ``MAX_HEAD_DIM`` channels,
    parameters on x's device and in x's dtype, no hook on a convolution (accelerate's, or any other that its
    forward would run)."""
    first, second = convolutions[:2]
    return (triton is not None and x.is_cuda and not torch.is_grad_enabled() and x.shape[1] > 1
            and max(head_dims) <= MAX_HEAD_DIM and first.kernel_size[0] <= MAX_TAPS
            and first.activation == second.activation and (first.bias is None) == (second.bias is None)
            and all(conv.kernel_size == first.kernel_size and conv.activation in ("silu", "swish", None)
                    and not (hasattr(conv, "_hf_hook") or conv._forward_hooks or conv._forward_pre_hooks)
                    and conv.weight.device == x.device
                    and conv.weight.dtype == x.dtype for conv in convolutions))


def convolved_heads(
    inputs: Sequence[torch.Tensor], taps: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
    states: Sequence[torch.Tensor | None], index: torch.Tensor, head_dim: int, silu: bool,
    l2_eps: float | None = None, output_final_state: bool = False, values_per_key: int = 1,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """out[g, b, j, t] = act(Σ_w taps[g][c, w] · x_g[b, t - W + 1 + w, c] + biases[g][c]) over the channels c of key
    head ``index[j]`` (``head_dim`` of them), positions before the first token read from ``states[g]`` (zeros where
    None), act silu or none: one or two groups of inputs x [B, T, H_k·d] -> out [G, B, H_v, T, d] contiguous (laid
    out otherwise with ``values_per_key``, below), in x's dtype, in one launch. With ``l2_eps``, every row
    out[g, b, j, t] [d] is then L2-normalised as fla's l2norm kernel normalises the rounded convolution
    (y / sqrt(Σ y² + l2_eps), y in float32 from x's dtype): the queries and keys of a recurrence that normalises
    them. With ``output_final_state``, the same launch also writes each group's new cache [B, H_k·d, W]
    (contiguous, in x's dtype: the last W inputs of every channel, the start of ``states[g]`` or zeros before the
    first token), returned as a tuple; None otherwise. With ``values_per_key`` = r > 1 (dividing H_v), out is laid
    out as fla lays out r value heads that share a key head, r heads interleaved token by token (``shared_keys``):
    [G, B, H_v / r, T, r, d], contiguous, head j at [:, :, j // r, :, j % r]."""
    groups = len(inputs)
    first = inputs[0]
    batch, length, channels = first.shape
    width = taps[0].shape[-1]
    if not 1 <= groups == len(taps) == len(biases) == len(states) <= 2:
        raise ValueError("convolved_heads takes one or two groups of inputs, taps, biases and states")
    if (any(x.shape != first.shape or x.stride() != first.stride() or x.dtype != first.dtype for x in inputs)
            or first.stride(-1) != 1 or channels % head_dim):
        raise ValueError("convolved_heads takes inputs [B, T, H·d] of one shape, dtype and layout, channels adjacent")
    if (any(w.shape != (channels, width) or not w.is_contiguous() for w in taps)
            or any(b is not None and (b.shape != (channels,) or not b.is_contiguous()) for b in biases)
            or any(s is not None and (s.shape != (batch, channels, width) or not s.is_contiguous()) for s in states)
            or len({b is None for b in biases}) > 1 or len({s is None for s in states}) > 1):
        raise ValueError(f"convolved_heads takes contiguous taps [{channels}, W], biases [{channels}] and states "
                         f"[{batch}, {channels}, W], all given or none")
    if index.dim() != 1 or not index.is_contiguous() or index.device != first.device or index.is_floating_point():
        raise ValueError("convolved_heads takes a contiguous integer index [H_v] on the inputs' device")
    heads = index.numel()
    ratio = checked_ratio(heads, values_per_key, "convolved_heads")
    out = torch.empty(groups, batch, *interleaved_shape(heads, length, ratio), head_dim, dtype=first.dtype,
                      device=first.device)
    new_states = tuple(torch.empty(batch, channels, width, dtype=first.dtype, device=first.device)
                       for _ in range(groups)) if output_final_state else None
    chunks = -(-length // BLOCK_TOKENS)
    convolving = chunks * groups * batch * heads
    caching = groups * batch * (channels // head_dim) if output_final_state else 0
    if convolving + caching:
        bias, state = biases[0] is not None, states[0] is not None
        with launching_on(first):
            short_conv_kernel[(convolving + caching,)](
                first, inputs[-1], taps[0], taps[-1], biases[0] if bias else taps[0], biases[-1] if bias else taps[0],
                states[0] if state else first, states[-1] if state else first, index, out,
                new_states[0] if caching else first, new_states[-1] if caching else first, length, batch, heads,
                chunks, channels, first.stride(0), first.stride(1), 0.0 if l2_eps is None else l2_eps, convolving,
                ratio,
                D=head_dim, W=width, BT=BLOCK_TOKENS, BD=next_power_of_2(head_dim), HAS_BIAS=bias, HAS_STATE=state,
                SILU=silu, NORMALISE=l2_eps is not None, num_warps=NUM_WARPS,
            )
    return out, new_states


if triton is not None:
    from .shared_keys import interleaved_row

    @triton.jit
    def _convolved(x, taps, bias, state, i_b, o_c, m_c, o_t, T, C, s_b, s_t, W: tl.constexpr, BT: tl.constexpr,
                   BD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, SILU: tl.constexpr):
        """The [BT, BD] float32 outputs of channels o_c at tokens o_t of sequence i_b: fla's causal_conv1d_fwd_kernel's
        sums (tap by tap, the initial state's inputs before token 0), bias and silu."""
        y = tl.zeros([BT, BD], dtype=tl.float32)
        for i_w in tl.static_range(W):
            o_x = o_t - (W - 1) + i_w
            x_w = tl.load(x + i_b * s_b + o_x[:, None] * s_t + o_c[None, :],
                          mask=((o_x >= 0) & (o_x < T))[:, None] & m_c[None, :], other=0.0).to(tl.float32)
            if HAS_STATE:
                x_w += tl.load(state + (i_b * C + o_c[None, :]) * W + (o_x + W)[:, None],
                               mask=((o_x < 0) & (o_x + W >= 0))[:, None] & m_c[None, :], other=0.0).to(tl.float32)
            x_w *= tl.load(taps + o_c * W + i_w, mask=m_c, other=0.0).to(tl.float32)[None, :]
            y += x_w
        if HAS_BIAS:
            y += tl.load(bias + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        return y

    @triton.jit
    def _cached(x, state, new, i_b, o_c, m_c, T, C, s_b, s_t, W: tl.constexpr, HAS_STATE: tl.constexpr):
        """new[i_b, o_c, w] = the input of channels o_c at token T - W + w of sequence i_b (read from ``state``,
        the cache before the first token, where that is negative; zeros without one)."""
        for i_w in tl.static_range(W):
            o_x = T - W + i_w + 0 * o_c  # the token, for every channel
            x_w = tl.load(x + i_b * s_b + o_x * s_t + o_c, mask=m_c & (o_x >= 0), other=0.0)
            if HAS_STATE:
                x_w = tl.where(o_x >= 0, x_w, tl.load(state + (i_b * C + o_c) * W + o_x + W,
                                                      mask=m_c & (o_x < 0), other=0.0).to(x_w.dtype))
            tl.store(new + (i_b * C + o_c) * W + i_w, x_w, mask=m_c)

    @triton.jit(do_not_specialize=["T", "B", "HV", "NT", "C", "NP", "R"])
    def short_conv_kernel(x0, x1, taps0, taps1, bias0, bias1, state0, state1, index, out, new0, new1, T, B, HV, NT,
                          C, s_b, s_t, eps, NP, R, D: tl.constexpr, W: tl.constexpr, BT: tl.constexpr,
                          BD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, SILU: tl.constexpr,
                          NORMALISE: tl.constexpr):
        """One program per BT tokens of one (group, sequence, value head j), the first NP: group g's (x0, taps0, ...
        for g = 0; x1, ... for g = 1) convolution of key head index[j]'s channels (NORMALISE: each token's rounded
        to out's dtype, then L2-normalised in float32 as fla's l2norm_fwd_kernel), written at row
        (i // R · T + t)·R + i % R, i = (g·B + b)·HV + j (R heads interleaved token by token; head-major for R = 1),
        times D, plus c; then any further programs, one per (group, sequence, key head): its
        channels' new cache in new0 or new1 (``_cached``)."""
        if tl.program_id(0) >= NP:
            i_gbk = (tl.program_id(0) - NP).to(tl.int64)
            i_gb, i_k = i_gbk // (C // D), i_gbk % (C // D)
            i_g, i_b = i_gb // B, i_gb % B
            o_d = tl.arange(0, BD).to(tl.int64)
            if i_g == 0:
                _cached(x0, state0, new0, i_b, i_k * D + o_d, o_d < D, T, C, s_b, s_t, W, HAS_STATE)
            else:
                _cached(x1, state1, new1, i_b, i_k * D + o_d, o_d < D, T, C, s_b, s_t, W, HAS_STATE)
        else:
            i_gbj = tl.program_id(0).to(tl.int64) // NT
            i_t = tl.program_id(0).to(tl.int64) % NT
            i_gb, i_j = i_gbj // HV, i_gbj % HV
            i_g, i_b = i_gb // B, i_gb % B
            o_d = tl.arange(0, BD).to(tl.int64)
            m_d = o_d < D
            o_c = tl.load(index + i_j).to(tl.int64) * D + o_d
            o_t = i_t * BT + tl.arange(0, BT)
            if i_g == 0:
                y = _convolved(x0, taps0, bias0, state0, i_b, o_c, m_d, o_t, T, C, s_b, s_t, W, BT, BD, HAS_BIAS,
                               HAS_STATE, SILU)
            else:
                y = _convolved(x1, taps1, bias1, state1, i_b, o_c, m_d, o_t, T, C, s_b, s_t, W, BT, BD, HAS_BIAS,
                               HAS_STATE, SILU)
            if NORMALISE:
                y = y.to(out.dtype.element_ty).to(tl.float32)
                y = y * (1 / tl.sqrt(tl.sum(y * y, 1) + eps))[:, None]
            o_row = interleaved_row(i_gbj, o_t, T, R)
            tl.store(out + o_row[:, None] * D + o_d[None, :], y.to(out.dtype.element_ty),
                     mask=(o_t < T)[:, None] & m_d[None, :])
