"""Eigenvalues of a batch of small symmetric matrices on a GPU, one Triton program per matrix, in float64.

``torch.linalg.eigvalsh`` solves a batch of 128 × 128 matrices on a GPU one cuSOLVER call at a time (0.63 s for
1152 of them on an H200), which made the spectra, not the forward pass, the cost of calibration. Here each matrix
is reduced to a symmetric tridiagonal one by Householder reflections held in registers (the trailing block that
is still to be reduced shrinks by halves, stage by stage), and every eigenvalue of the tridiagonal matrix is found
by bisection with Sturm counts, all eigenvalues of one matrix at once. Both steps are backward stable: the
eigenvalues carry an absolute error of a few float64 ulps of the largest one, as LAPACK's do.

``eigvalsh`` keeps ``torch.linalg.eigvalsh``'s signature and meaning (ascending eigenvalues), which is the
reference the kernels are tested against (under Triton's interpreter on CPU tensors).

Shapes: matrices [M, n, n] float64 (symmetric; only n ≤ 128 runs in registers), eigenvalues [M, n] float64.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # ImportError, or a triton that cannot initialise here
    HAS_TRITON = False

MAX_KERNEL_SIZE = 128
"""Largest matrix (after padding to a power of two) held in one program's registers."""
LAST_STAGE_SIZE = 16
"""The trailing block stops halving at this size."""
BISECTION_STEPS = 52
"""Halvings of the Gershgorin interval: 2⁻⁵² of its width is below a float64 ulp of the largest eigenvalue."""


def kernel_available(matrices: torch.Tensor) -> bool:
    """Whether :func:`eigvalsh_triton` can take ``matrices`` [M, n, n]: Triton on a CUDA tensor with n ≤ 128."""
    return HAS_TRITON and matrices.is_cuda and matrices.shape[-1] <= MAX_KERNEL_SIZE


def eigvalsh(matrices: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the symmetric ``matrices`` [..., n, n], ascending: [..., n] float64. The Triton kernels where
    :func:`kernel_available`, ``torch.linalg.eigvalsh`` otherwise."""
    matrices = matrices.double()
    if kernel_available(matrices):
        return eigvalsh_triton(matrices.flatten(0, -3)).unflatten(0, matrices.shape[:-2])
    return torch.linalg.eigvalsh(matrices)


def eigvalsh_triton(matrices: torch.Tensor) -> torch.Tensor:
    """:func:`eigvalsh` by the Triton kernels: ``matrices`` [M, n, n] float64 (n ≤ 128) -> [M, n] ascending.

    Matrices whose size is not a power of two are padded with zero rows and columns, whose zero eigenvalues are
    then taken out again (one per padded row, the ones nearest to zero).
    """
    count, size = matrices.shape[0], matrices.shape[-1]
    padded = max(triton.next_power_of_2(size), LAST_STAGE_SIZE)
    if padded > MAX_KERNEL_SIZE:
        raise ValueError(f"the kernel holds matrices up to {MAX_KERNEL_SIZE} x {MAX_KERNEL_SIZE}, got {size} x {size}")
    work = matrices.new_zeros(count, padded, padded)
    work[:, :size, :size] = matrices  # reduced in place
    diagonal = matrices.new_empty(count, padded)
    off_diagonal = torch.zeros_like(diagonal)
    values = torch.empty_like(diagonal)
    if count:
        stages = (padded // LAST_STAGE_SIZE).bit_length()
        _tridiagonalize_kernel[(count,)](work, diagonal, off_diagonal, N=padded, STAGES=stages, num_warps=8)
        _bisection_kernel[(count,)](diagonal, off_diagonal, values, N=padded, STEPS=BISECTION_STEPS, num_warps=2)
    if padded == size:
        return values
    drop = values.abs().topk(padded - size, dim=-1, largest=False).indices  # the padding's zero eigenvalues
    keep = torch.ones_like(values, dtype=torch.bool).scatter_(-1, drop, False)
    return values[keep].view(count, size)


if HAS_TRITON:

    @triton.jit
    def _reduce_block(base, N: tl.constexpr, SIZE: tl.constexpr, STOP: tl.constexpr):
        """Householder steps for the columns N - SIZE … STOP - 1 of the matrix at ``base`` [N, N], on its trailing
        SIZE × SIZE block held in registers: each step makes one column tridiagonal, A ← H A H, H = I - β v vᵀ."""
        start: tl.constexpr = N - SIZE
        index = tl.arange(0, SIZE)
        offsets = (start + index)[:, None] * N + (start + index)[None, :]
        a = tl.load(base + offsets)
        for k in range(STOP - start):
            column = tl.sum(tl.where(index[:, None] == k, a, 0.0), axis=0)  # row k = column k of the block
            x = tl.where(index > k, column, 0.0)  # the part to reflect onto e_{k+1}
            squared = tl.sum(x * x)
            head = tl.sum(tl.where(index == k + 1, x, 0.0))
            alpha = tl.where(head > 0, -tl.sqrt(squared), tl.sqrt(squared))  # the new A[k+1, k]
            v = tl.where(index == k + 1, x - alpha, x)
            v_squared = squared - 2.0 * alpha * head + alpha * alpha
            beta = tl.where(v_squared > 0, 2.0 / tl.where(v_squared > 0, v_squared, 1.0), 0.0)
            p = beta * tl.sum(a * v[:, None], axis=0)  # β Aᵀ v = β A v
            w = p - (0.5 * beta * tl.sum(p * v)) * v
            a = a - v[:, None] * w[None, :] - w[:, None] * v[None, :]
        tl.store(base + offsets, a)

    @triton.jit
    def _tridiagonalize_kernel(matrices, diagonal, off_diagonal, N: tl.constexpr, STAGES: tl.constexpr):
        """matrices [M, N, N] (overwritten) -> diagonal [M, N] and off_diagonal [M, N] (entry j: T[j + 1, j]; the
        last one is left as it is) of a tridiagonal matrix with the same eigenvalues. Trailing blocks of N, N/2, …
        rows (STAGES of them): each reduces the first half of its columns, the last block all the rest."""
        m = tl.program_id(0).to(tl.int64)
        base = matrices + m * N * N
        for stage in tl.static_range(STAGES):
            if stage < STAGES - 1:
                _reduce_block(base, N, N >> stage, N - (N >> (stage + 1)))
            else:
                _reduce_block(base, N, N >> stage, N - 2)
            tl.debug_barrier()  # the next, smaller block (and the read below) sees what this one stored
        index = tl.arange(0, N)
        tl.store(diagonal + m * N + index, tl.load(base + index * (N + 1)))
        inside = index < N - 1
        tl.store(off_diagonal + m * N + index, tl.load(base + index * (N + 1) + N, mask=inside), mask=inside)

    @triton.jit
    def _bisection_kernel(diagonal, off_diagonal, values, N: tl.constexpr, STEPS: tl.constexpr):
        """Every eigenvalue of the tridiagonal matrices (diagonal, off_diagonal [M, N]) -> values [M, N] ascending.

        Lane j bisects the Gershgorin interval for the j-th smallest eigenvalue: the number of eigenvalues below a
        shift x is the number of negative pivots of T - x I (Sturm), pivots that are zero taken as -1e-300."""
        m = tl.program_id(0).to(tl.int64)
        index = tl.arange(0, N)
        d = tl.load(diagonal + m * N + index)
        e = tl.load(off_diagonal + m * N + index, mask=index < N - 1, other=0.0)
        e_before = tl.load(off_diagonal + m * N + index - 1, mask=index > 0, other=0.0)
        low_bound = tl.min(d - tl.abs(e) - tl.abs(e_before))
        high_bound = tl.max(d + tl.abs(e) + tl.abs(e_before))
        margin = 1e-15 * (high_bound - low_bound) + 1e-300
        low = tl.zeros([N], tl.float64) + (low_bound - margin)
        high = tl.zeros([N], tl.float64) + (high_bound + margin)
        first = tl.load(diagonal + m * N)
        for _ in range(STEPS):
            shift = 0.5 * (low + high)
            pivot = first - shift
            pivot = tl.where(tl.abs(pivot) < 1e-300, -1e-300, pivot)
            below = (pivot < 0).to(tl.int32)
            for i in range(1, N):
                coupling = tl.load(off_diagonal + m * N + i - 1)
                pivot = tl.load(diagonal + m * N + i) - shift - coupling * coupling / pivot
                pivot = tl.where(tl.abs(pivot) < 1e-300, -1e-300, pivot)
                below += (pivot < 0).to(tl.int32)
            above_target = below > index  # more than j eigenvalues below the shift: the j-th is below it
            high = tl.where(above_target, shift, high)
            low = tl.where(above_target, low, shift)
        tl.store(values + m * N + index, 0.5 * (low + high))
