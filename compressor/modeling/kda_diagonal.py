"""KDA's intra-chunk scores within each block of ``BLOCK`` tokens, for heads laid out as batch entries of one head.

Shipped inside KDA output folders (imports only torch and, where installed, triton). fla's chunked KDA forward
first computes, within every 16-token block of a chunk, the scores of each query and key with the keys before it
under the per-channel decay between them: Aqk[i, j] = scale · Σ_c q_i,c k_j,c 2^(G_i,c - G_j,c) and
Akk[i, j] = β_i Σ_c k_i,c k_j,c 2^(G_i,c - G_j,c) (j < i), G the decay's chunk-local sums in base 2. Its
token-parallel kernel gives every token a program and every program a few heads of that token; where each head is a
batch entry of its own (``packed_heads.heads_as_batch``), a program holds one row of one head and waits on a chain of
16 dependent loads. ``diagonal_blocks`` computes the same sums, element by element and in the same order of
operations, with one program per block of one head, which loads the block's queries, keys and decays once.

Shapes (fla's, heads as batch entries): q, k [S, T, 1, K]; g [S, T, 1, K] float32; beta [S, T, 1]; Aqk
[S, T, 1, BT] in k's dtype, written at the columns of each row's block up to the row's own token; Akk [S, T, 1, BLOCK]
float32, written up to the row's own token (zero there). CPU tensors only under Triton's interpreter.
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
NUM_WARPS = 4


def diagonal_blocks(q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, scale: float,
                    Aqk: torch.Tensor, Akk: torch.Tensor) -> None:
    """Write the scores of each ``BLOCK``-token block (see the module's docstring) into Aqk [S, T, 1, BT] and
    Akk [S, T, 1, BLOCK], as fla's ``chunk_kda_fwd_intra_token_parallel`` does for H = 1; q, k, g and beta
    contiguous, g the chunk-local sums in base 2 of chunks of BT tokens (a multiple of ``BLOCK``)."""
    batch, length, _, width = k.shape
    chunk = Aqk.shape[-1]
    if chunk % BLOCK or Akk.shape[-1] != BLOCK or q.shape[2] != 1:
        raise ValueError(f"diagonal_blocks takes one head per batch entry and chunks of a multiple of {BLOCK} tokens")
    if not all(x.is_contiguous() for x in (q, k, g, beta, Aqk, Akk)):
        raise ValueError("diagonal_blocks takes contiguous tensors")
    if batch and length:
        with launching_on(k):
            diagonal_blocks_kernel[(-(-length // BLOCK), batch)](
                q, k, g, beta, Aqk, Akk, scale, length, K=width, BK=next_power_of_2(width), BT=chunk, BC=BLOCK,
                num_warps=NUM_WARPS,
            )


if triton is not None:

    @triton.jit(do_not_specialize=["T"])
    def diagonal_blocks_kernel(q, k, g, beta, Aqk, Akk, scale, T, K: tl.constexpr, BK: tl.constexpr,
                               BT: tl.constexpr, BC: tl.constexpr):
        """One program per block of BC tokens (program 0) of one batch entry (program 1): column j of the block's
        scores from key j and decay j, for each j up to the block's last token, as fla's token-parallel kernel
        computes row i's entry j."""
        i_s, i_b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
        i_ts = i_s * BC
        bos = i_b * T
        o_i = tl.arange(0, BC)
        o_t = i_ts + o_i
        m_t = o_t < T
        o_k = tl.arange(0, BK)
        m_k = o_k < K
        rows = (bos + o_t)[:, None] * K + o_k[None, :]
        m_tk = m_t[:, None] & m_k[None, :]
        b_q = tl.load(q + rows, mask=m_tk, other=0).to(tl.float32)
        b_k = tl.load(k + rows, mask=m_tk, other=0).to(tl.float32)
        b_g = tl.load(g + rows, mask=m_tk, other=0.0).to(tl.float32)
        b_k = b_k * tl.load(beta + bos + o_t, mask=m_t, other=0.0).to(tl.float32)[:, None]
        b_Aqk = tl.zeros([BC, BC], dtype=tl.float32)
        b_Akk = tl.zeros([BC, BC], dtype=tl.float32)
        for j in range(0, tl.minimum(BC, T - i_ts)):
            b_kj = tl.load(k + (bos + i_ts + j) * K + o_k, mask=m_k, other=0).to(tl.float32)
            b_gj = tl.load(g + (bos + i_ts + j) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
            b_kgj = tl.where(m_k[None, :], b_kj[None, :] * tl.math.exp2(b_g - b_gj[None, :]), 0.0)
            b_aqk = tl.sum(b_q * b_kgj, axis=1) * scale
            b_akk = tl.sum(b_k * b_kgj, axis=1) * tl.where(j < o_i, 1.0, 0.0)
            b_Aqk = tl.where((o_i == j)[None, :], b_aqk[:, None], b_Aqk)
            b_Akk = tl.where((o_i == j)[None, :], b_akk[:, None], b_Akk)
        m_store = m_t[:, None] & (o_i[None, :] <= o_i[:, None])
        out_rows = (bos + o_t)[:, None]
        tl.store(Aqk + out_rows * BT + (i_ts % BT + o_i)[None, :], b_Aqk.to(Aqk.dtype.element_ty), mask=m_store)
        tl.store(Akk + out_rows * BC + o_i[None, :], b_Akk.to(Akk.dtype.element_ty), mask=m_store)
