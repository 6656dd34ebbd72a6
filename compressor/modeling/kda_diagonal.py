"""KDA's intra-chunk scores within each block of ``BLOCK`` tokens, for heads laid out as batch entries of one head.

Shipped inside output folders with ``fla_chunk.py``, which imports it (imports only torch and, where installed,
triton). fla's chunked KDA forward first computes, within every 16-token block of a chunk, the scores of each query
and key with the keys before it under the per-channel decay between them: Aqk[i, j] = scale · Σ_c q_i,c k_j,c
2^(G_i,c - G_j,c) and Akk[i, j] = β_i Σ_c k_i,c k_j,c 2^(G_i,c - G_j,c) (j < i), G the decay's chunk-local sums in
base 2. Its token-parallel kernel gives every token a program and every program the same token of a few adjacent
heads; where each head is a batch entry of its own (``packed_heads.heads_as_batch``), a head is all a program finds
there. ``diagonal_blocks`` runs the same computation, element by element and in the same order of operations, with
each program taking the same token of ``BLOCK_ENTRIES`` adjacent batch entries, as fla's takes heads.

Shapes (fla's, heads as batch entries of one query/key head and HV value heads, HV = 1 but where value heads share a
key head): q, k [S, T, 1, K]; g [S, T, HV, K] float32; beta [S, T, HV]; Aqk [S, T, HV, BT] in k's dtype, written at the
columns of each row's block up to the row's own token; Akk [S, T, HV, BLOCK] float32, written up to the row's own
token (zero there). CPU tensors only under Triton's interpreter.
"""

from __future__ import annotations

import torch

from .fla_decode_step import launching_on, next_power_of_2

try:  # KDA folders run on fla, which needs triton
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BLOCK = 16
"""Tokens per diagonal block: fla's sub-chunk (``BC``), which its solve of the intra-chunk system reads."""
BLOCK_ENTRIES = 2
"""Batch entries per program (fla's ``BH``; ``scripts/tune_project_kernels.py`` times the choices)."""
NUM_WARPS = 1
"""Warps per program (timed with ``BLOCK_ENTRIES``)."""


def diagonal_blocks(q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, scale: float,
                    Aqk: torch.Tensor, Akk: torch.Tensor) -> None:
    """Write the scores of each ``BLOCK``-token block (see the module's docstring) into Aqk [S, T, HV, BT] and
    Akk [S, T, HV, BLOCK], as fla's ``chunk_kda_fwd_intra_token_parallel`` does for H = 1 query/key head and HV value
    heads (g [S, T, HV, K], beta [S, T, HV]: fla's layout of value heads that share a key head; HV = 1 where each
    entry is one head); q, k, g and beta contiguous, g the chunk-local sums in base 2 of chunks of BT tokens (a
    multiple of ``BLOCK``)."""
    batch, length, _, width = k.shape
    heads, chunk = g.shape[2], Aqk.shape[-1]
    if chunk % BLOCK or Akk.shape[-1] != BLOCK or q.shape[2] != 1 or k.shape[2] != 1:
        raise ValueError(f"diagonal_blocks takes one query/key head per batch entry and chunks of a multiple of "
                         f"{BLOCK} tokens")
    if not all(x.is_contiguous() for x in (q, k, g, beta, Aqk, Akk)):
        raise ValueError("diagonal_blocks takes contiguous tensors")
    units = batch * heads
    if units and length:
        with launching_on(k):
            diagonal_blocks_kernel[(length, -(-units // BLOCK_ENTRIES))](
                q, k, g, beta, Aqk, Akk, scale, length, units, heads, K=width, BK=next_power_of_2(width), BT=chunk,
                BC=BLOCK, BH=BLOCK_ENTRIES, num_warps=NUM_WARPS,
            )


if triton is not None:

    @triton.jit(do_not_specialize=["T", "S", "HV"])
    def diagonal_blocks_kernel(q, k, g, beta, Aqk, Akk, scale, T, S, HV, K: tl.constexpr, BK: tl.constexpr,
                               BT: tl.constexpr, BC: tl.constexpr, BH: tl.constexpr):
        """One program per token (program 0) of BH of the S (batch entry, value head) units, HV value heads per entry
        (program 1): row i's entries j from the start of its block up to i, as fla's token-parallel kernel computes
        them; unit u reads the queries and keys of entry u // HV at rows (u // HV)·T + t, and its gate, beta and
        scores at rows ((u // HV)·T + t)·HV + u % HV."""
        i_t, i_bg = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
        i_ts = i_t // BC * BC
        o_b = i_bg * BH + tl.arange(0, BH)
        m_b = o_b < S
        o_k = tl.arange(0, BK)
        m_k = o_k < K
        m_bk = m_b[:, None] & m_k[None, :]
        rows = o_b // HV * T  # each unit's entry's first token
        o_v = o_b % HV  # each unit's value head within its entry
        p_i = (rows + i_t)[:, None] * K + o_k[None, :]
        p_iv = ((rows + i_t) * HV + o_v)[:, None] * K + o_k[None, :]
        b_q = tl.load(q + p_i, mask=m_bk, other=0).to(tl.float32)
        b_k = tl.load(k + p_i, mask=m_bk, other=0).to(tl.float32)
        b_g = tl.load(g + p_iv, mask=m_bk, other=0.0).to(tl.float32)
        b_k = b_k * tl.load(beta + (rows + i_t) * HV + o_v, mask=m_b, other=0.0).to(tl.float32)[:, None]
        for j in range(i_ts, tl.minimum(i_t + 1, tl.minimum(T, i_ts + BC))):
            p_j = (rows + j)[:, None] * K + o_k[None, :]
            b_kj = tl.load(k + p_j, mask=m_bk, other=0).to(tl.float32)
            b_gj = tl.load(g + ((rows + j) * HV + o_v)[:, None] * K + o_k[None, :], mask=m_bk, other=0.0).to(tl.float32)
            b_kgj = tl.where(m_k[None, :], b_kj * tl.math.exp2(b_g - b_gj), 0.0)
            b_aqk = tl.sum(b_q * b_kgj, axis=1) * scale
            b_akk = tl.sum(b_k * b_kgj, axis=1) * tl.where(j < i_t, 1.0, 0.0)
            tl.store(Aqk + ((rows + i_t) * HV + o_v) * BT + j % BT, b_aqk.to(Aqk.dtype.element_ty), mask=m_b)
            tl.store(Akk + ((rows + i_t) * HV + o_v) * BC + j - i_ts, b_akk.to(Akk.dtype.element_ty), mask=m_b)
