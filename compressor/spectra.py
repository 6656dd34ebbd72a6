"""Eigenvalues of a batch of small Gram matrices on a GPU, one Triton program per matrix, in float64; and the state
metrics computed from them.

``torch.linalg.eigvalsh`` solves a batch of 128 × 128 matrices on a GPU one cuSOLVER call at a time, which made the
spectra, not the forward pass, the cost of calibration (docs/benchmarks.md, "Spectra kernels"). Here each matrix
is reduced to a symmetric tridiagonal one by Householder reflections held in registers (the trailing block that
is still to be reduced shrinks by halves, stage by stage), which is backward stable. Its eigenvalues are then found
by Sturm counts, all of one matrix at once (sign changes of the leading minors, by their three-term recurrence,
without divisions): one sweep counts the eigenvalues below a geometric grid that spans 64 octaves under the
Gershgorin bound, which brackets every eigenvalue within a factor of 2^(64 / (n - 1)) (1.42 for n = 128), and each
bracket is bisected. The error of an eigenvalue λ is below 2⁻²⁵ of its bracket (1.25e-8·λ for n = 128) plus the few
float64 ulps of the largest eigenvalue that any backward-stable method has; eigenvalues under 2⁻⁶⁴ of the bound come
out within that of zero. The matrices must be positive semi-definite (Gram matrices): the grid holds no negative
eigenvalues.

``eigvalsh`` keeps ``torch.linalg.eigvalsh``'s signature and meaning (ascending eigenvalues), which is the
reference the kernels are tested against (under Triton's interpreter on CPU tensors). ``spectral_metrics_triton``
adds one kernel that turns the eigenvalues into the metrics of :mod:`compressor.metrics` (threshold, stable and
entropy ranks, nuclear and Frobenius norms), in float64, so calibration reduces a group of states in a Gram product
and four launches (two for the tridiagonalisation, one for the bisection, one for the metrics).

Shapes: matrices [M, n, n] float64 (positive semi-definite; only n ≤ 128 runs in registers), eigenvalues [M, n]
float64, metrics [M, 5] float32.
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
GRID_OCTAVES = 64
"""The grid that brackets the eigenvalues spans the Gershgorin bound g down to 2⁻⁶⁴·g: smaller eigenvalues come out
within 2⁻⁶⁴·g of zero (their square roots, the singular values of a state, within 2⁻³² of the largest)."""
LATER_STAGE_WARPS = 2
"""Warps per matrix for the stages after the first (blocks of n/2 and less), which run in a launch of their own: the
first stage's 8 warps of 255 registers fill a multiprocessor, the later blocks need far fewer, and several matrices
then share one (the timings that chose 2: docs/benchmarks.md, "Spectra kernels")."""
BISECTION_STEPS = 24
"""Halvings of each eigenvalue's bracket, whose width is below (2^(64 / (n - 1)) - 1)·λ: an error below 2⁻²⁵ of that
(1.25e-8·λ for n = 128, 5.4e-7·λ for n = 16), a relative error of the singular value half that (6e-9 at n = 128),
under the 6e-8 of the float32 metrics calibration keeps."""


TINY_PIVOT = 2.0**-200
"""Sturm counts replace a pivot smaller than this in magnitude by a negative one of this size, on the matrix scaled to
eigenvalues in [0, 1]: that moves a diagonal entry by at most 2^-199 of the largest eigenvalue, and keeps the minors
of the division-free recurrence in range (consecutive ones differ by at most a factor 2^202)."""


def kernel_available(matrices: torch.Tensor) -> bool:
    """Whether :func:`eigvalsh_triton` can take ``matrices`` [M, n, n]: Triton on a CUDA tensor with n ≤ 128."""
    return HAS_TRITON and matrices.is_cuda and matrices.shape[-1] <= MAX_KERNEL_SIZE


def eigvalsh(matrices: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the positive semi-definite ``matrices`` [..., n, n], ascending: [..., n] float64. The Triton
    kernels where :func:`kernel_available`, ``torch.linalg.eigvalsh`` otherwise."""
    matrices = matrices.double()
    if kernel_available(matrices):
        return eigvalsh_triton(matrices.flatten(0, -3)).unflatten(0, matrices.shape[:-2])
    return torch.linalg.eigvalsh(matrices)


def eigvalsh_triton(matrices: torch.Tensor) -> torch.Tensor:
    """:func:`eigvalsh` by the Triton kernels: ``matrices`` [M, n, n] float64 (n ≤ 128) -> [M, n] ascending.

    Matrices whose size is not a power of two are padded with zero rows and columns, whose zero eigenvalues are
    then taken out again (one per padded row, the ones nearest to zero).
    """
    values = eigenvalues_padded(matrices)
    count, size, padded = matrices.shape[0], matrices.shape[-1], values.shape[-1]
    if padded == size:
        return values
    drop = values.abs().topk(padded - size, dim=-1, largest=False).indices  # the padding's zero eigenvalues
    keep = torch.ones_like(values, dtype=torch.bool).scatter_(-1, drop, False)
    return values[keep].view(count, size)


def eigenvalues_padded(matrices: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    """Eigenvalues [M, n'] ascending of ``matrices`` [M, n, n] float64 padded with zero rows and columns to n', the
    next power of two (at least 16): those of the matrices and n' - n zeros. With ``overwrite``, matrices that need no
    padding are reduced in place (a caller's temporary) instead of in a copy."""
    count, size = matrices.shape[0], matrices.shape[-1]
    padded = max(triton.next_power_of_2(size), LAST_STAGE_SIZE)
    if padded > MAX_KERNEL_SIZE:
        raise ValueError(f"the kernel holds matrices up to {MAX_KERNEL_SIZE} x {MAX_KERNEL_SIZE}, got {size} x {size}")
    if padded == size:
        work = matrices if overwrite and matrices.is_contiguous() else matrices.clone()  # reduced in place
    else:
        work = matrices.new_zeros(count, padded, padded)
        work[:, :size, :size] = matrices
    diagonal = matrices.new_empty(count, padded)
    squared_off_diagonal = torch.zeros_like(diagonal)
    counts = torch.empty(count, padded, dtype=torch.int32, device=matrices.device)
    values = torch.empty_like(diagonal)
    if count:
        stages = (padded // LAST_STAGE_SIZE).bit_length()
        launches = [(0, 1, 8)] + ([(1, stages, LATER_STAGE_WARPS)] if stages > 1 else [])  # (first, stop, warps)
        for first, stop, warps in launches:
            _tridiagonalize_kernel[(count,)](
                work, diagonal, squared_off_diagonal, N=padded, FIRST=first, STOP=stop, STAGES=stages, num_warps=warps)
        _bisection_kernel[(count,)](  # warps per matrix: docs/benchmarks.md, "Spectra kernels"
            diagonal, squared_off_diagonal, counts, values, N=padded, STEPS=BISECTION_STEPS, OCTAVES=GRID_OCTAVES,
            num_warps=4 if count <= 1024 else 2)
    return values


def spectral_metrics_triton(matrices: torch.Tensor, eps: float, size: int, overwrite: bool = False) -> torch.Tensor:
    """Metrics of the states whose Gram matrices are ``matrices`` [M, n, n] float64 (n ≤ 128), by the Triton kernels:
    [M, 5] float32, the columns of :data:`compressor.metrics.METRICS` as :func:`~compressor.metrics.metric_table`
    defines them (``eps``: the threshold rank's, ``size``: min(d_k, d_v), the stable rank's divisor), computed in
    float64 from the singular values sqrt(max(λ, 0)) of the eigenvalues (padding adds zeros, which change none).
    ``overwrite``: as :func:`eigenvalues_padded`'s."""
    values = eigenvalues_padded(matrices, overwrite)
    metrics = torch.empty(values.shape[0], 5, dtype=torch.float32, device=values.device)
    if values.shape[0]:
        _metrics_kernel[(values.shape[0],)](values, metrics, eps, size, N=values.shape[1], num_warps=4)
    return metrics


if HAS_TRITON:
    _TINY_PIVOT = tl.constexpr(TINY_PIVOT)

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
    def _tridiagonalize_kernel(matrices, diagonal, squared_off_diagonal, N: tl.constexpr, FIRST: tl.constexpr,
                               STOP: tl.constexpr, STAGES: tl.constexpr):
        """matrices [M, N, N] (reduced in place) -> diagonal [M, N] and squared_off_diagonal [M, N] (entry j:
        T[j + 1, j]²; the last one is left as it is) of a tridiagonal matrix with the same eigenvalues. Trailing blocks
        of N, N/2, … rows (STAGES of them): each reduces the first half of its columns, the last block all the rest.
        One launch runs the stages FIRST … STOP - 1; the one that runs the last stage writes the tridiagonal matrix."""
        m = tl.program_id(0).to(tl.int64)
        base = matrices + m * N * N
        for stage in tl.static_range(FIRST, STOP):
            if stage < STAGES - 1:
                _reduce_block(base, N, N >> stage, N - (N >> (stage + 1)))
            else:
                _reduce_block(base, N, N >> stage, N - 2)
            tl.debug_barrier()  # the next, smaller block (and the read below) sees what this one stored
        if STOP < STAGES:
            return
        index = tl.arange(0, N)
        tl.store(diagonal + m * N + index, tl.load(base + index * (N + 1)))
        inside = index < N - 1
        coupling = tl.load(base + index * (N + 1) + N, mask=inside)
        tl.store(squared_off_diagonal + m * N + index, coupling * coupling, mask=inside)

    @triton.jit
    def _sturm_step(value, current, negative, below):
        """One step of :func:`_sturm_counts`: the next leading minor ``value`` [N] of T - x I, ``current`` [N] the one
        before it (|current| in [1, 2); ``negative``: its sign) -> (the new current, the new one before it, its sign,
        the count ``below`` updated). A pivot value / current under TINY_PIVOT in magnitude becomes -TINY_PIVOT
        (Kahan's tiny pivot: it moves a diagonal entry by at most 2·TINY_PIVOT), a negative pivot counts one
        eigenvalue below x, and both minors are then scaled by the power of two that brings |value| into [1, 2),
        exactly (the exponent bits only)."""
        value = tl.where(tl.abs(value) < _TINY_PIVOT, tl.where(negative, _TINY_PIVOT, -_TINY_PIVOT), value)
        bits = value.to(tl.int64, bitcast=True)
        below += ((bits < 0) != negative).to(tl.int32)
        rescale = (((bits >> 52) & 0x7FF) - 1023) << 52  # the exponent of value, in place
        before = (current.to(tl.int64, bitcast=True) - rescale).to(tl.float64, bitcast=True)
        return (bits - rescale).to(tl.float64, bitcast=True), before, bits < 0, below

    @triton.jit
    def _sturm_counts(diagonal, squared_off_diagonal, shift, N: tl.constexpr):
        """How many eigenvalues of the tridiagonal matrix (diagonal [N], squared off-diagonal [N - 1] at the
        pointers, scaled so that its entries are at most 1 in magnitude) lie below each of ``shift`` [N] (in
        [-1, 1]): the sign changes of its leading principal minors p_i of T - x I, by the three-term recurrence
        p_i = (d_i - x) p_{i-1} - e²_{i-1} p_{i-2} (no division: a float64 division is a dozen instructions), kept
        in range by :func:`_sturm_step`. The pivots p_i / p_{i-1} are those of the LDLᵀ recurrence, whose count
        is backward stable (Kahan)."""
        current, before, negative, below = _sturm_step(
            tl.load(diagonal) - shift, tl.full(shift.shape, 1.0, tl.float64), tl.zeros(shift.shape, tl.int1),
            tl.zeros(shift.shape, tl.int32))
        for i in range(1, N):
            value = (tl.load(diagonal + i) - shift) * current - tl.load(squared_off_diagonal + i - 1) * before
            current, before, negative, below = _sturm_step(value, current, negative, below)
        return below

    @triton.jit
    def _grid_point(top, k, N: tl.constexpr, OCTAVES: tl.constexpr):
        """The k-th point [k.shape] of the geometric grid top, …, top·2^-OCTAVES (N points)."""
        return top * tl.exp2(-(OCTAVES / (N - 1)) * k.to(tl.float64))

    @triton.jit
    def _power_of_two_above(x):
        """The smallest power of two 2^e >= x > 0 (float64), from the exponent bits."""
        bits = x.to(tl.int64, bitcast=True)
        exponent = (bits >> 52) & 0x7FF
        exponent = tl.where((bits & 0xFFFFFFFFFFFFF) != 0, exponent + 1, exponent)  # not a power of two: the next one
        return (exponent << 52).to(tl.float64, bitcast=True)

    @triton.jit
    def _bisection_kernel(diagonal, squared_off_diagonal, counts, values, N: tl.constexpr, STEPS: tl.constexpr,
                          OCTAVES: tl.constexpr):
        """Every eigenvalue of positive semi-definite tridiagonal matrices (diagonal, squared_off_diagonal [M, N],
        both scaled in place by powers of two) -> values [M, N] ascending (``counts`` [M, N] int32: scratch).

        The matrix is first scaled by the power of two at or above its Gershgorin bound (exactly), so that its
        eigenvalues lie in [0, 1]. One Sturm sweep counts the eigenvalues below the N points of a geometric grid from
        the bound down by 2^-OCTAVES, one point per lane; that brackets each eigenvalue between two neighbouring
        points (a ratio of 2^(OCTAVES / (N - 1))), and lane j bisects the bracket of the j-th smallest one STEPS
        times. Eigenvalues below the grid (zero, or rounding below zero) come out within its last point of zero."""
        m = tl.program_id(0).to(tl.int64)
        index = tl.arange(0, N)
        row, row_squared = diagonal + m * N, squared_off_diagonal + m * N
        coupling = tl.sqrt(tl.load(row_squared + index, mask=index < N - 1, other=0.0))
        coupling_before = tl.sqrt(tl.load(row_squared + index - 1, mask=index > 0, other=0.0))
        top = tl.max(tl.load(row + index) + coupling + coupling_before) * (1.0 + 1e-12)  # above every eigenvalue
        scale = _power_of_two_above(tl.where(top > 0, top, 1.0))  # a zero matrix: any scale, its values are 0 below
        inverse = 1.0 / scale  # a power of two: scaling is exact
        tl.store(row + index, tl.load(row + index) * inverse)
        tl.store(row_squared + index, tl.load(row_squared + index) * inverse * inverse, mask=index < N - 1)
        tl.debug_barrier()  # every lane reads every lane's scaled entries
        top = top * inverse
        tl.store(counts + m * N + index, _sturm_counts(row, row_squared, _grid_point(top, index, N, OCTAVES), N))
        tl.debug_barrier()  # every lane reads every lane's count
        last = tl.zeros([N], tl.int32)  # the last grid point with more than j eigenvalues below it: above the j-th
        for k in range(1, N):
            last = tl.where(tl.load(counts + m * N + k) > index, k, last)
        high = _grid_point(top, last, N, OCTAVES)
        low = tl.where(last < N - 1, _grid_point(top, last + 1, N, OCTAVES), -high)
        for _ in range(STEPS):
            shift = 0.5 * (low + high)
            above_target = _sturm_counts(row, row_squared, shift, N) > index  # the j-th eigenvalue is below shift
            high = tl.where(above_target, shift, high)
            low = tl.where(above_target, low, shift)
        tl.store(values + m * N + index, tl.where(top > 0, 0.5 * (low + high) * scale, 0.0))

    @triton.jit
    def _metrics_kernel(values, metrics, eps, size, N: tl.constexpr):
        """Eigenvalues [M, N] of Gram matrices -> metrics [M, 5] of their states, in float64: threshold rank
        #{σ > eps·σ_1}, stable rank Σσ² / σ_1² / size, entropy rank exp(-Σ p log p) with p = σ / Σσ, nuclear norm Σσ
        and Frobenius norm sqrt(Σσ²), σ = sqrt(max(λ, 0)); a zero matrix has every metric 0."""
        m = tl.program_id(0).to(tl.int64)
        sigma = tl.sqrt(tl.maximum(tl.load(values + m * N + tl.arange(0, N)), 0.0))
        top = tl.max(sigma)
        nuclear = tl.sum(sigma)
        squares = tl.sum(sigma * sigma)
        p = sigma / tl.where(nuclear > 0, nuclear, 1.0)
        entropy = -tl.sum(tl.where(p > 0, p * tl.log(tl.where(p > 0, p, 1.0)), 0.0))
        nonzero = top > 0
        row = metrics + m * 5
        tl.store(row, tl.sum((sigma > eps * top).to(tl.float64)).to(tl.float32))
        tl.store(row + 1, tl.where(nonzero, squares / tl.where(nonzero, top * top, 1.0) / size, 0.0).to(tl.float32))
        tl.store(row + 2, tl.where(nonzero, tl.exp(entropy), 0.0).to(tl.float32))
        tl.store(row + 3, nuclear.to(tl.float32))
        tl.store(row + 4, tl.sqrt(squares).to(tl.float32))
