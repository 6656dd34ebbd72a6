"""Rank-revealing QR: which k columns of a matrix span it best.

``pivoted_qr`` is Businger–Golub column-pivoted Householder QR (torch.linalg.qr has no pivoting); ``strong_rrqr``
follows it with Gu and Eisenstat's swaps (strong RRQR, algorithm 4 of their 1996 paper): with R split after k
columns into A [k, k], B [k, n-k], C [n-k, n-k], swap kept column i with left-out column j while
ρ_ij = sqrt((A⁻¹B)_ij² + (γ_j / ω_i)²) > f, where γ_j is the norm of column j of C and ω_i = 1 / ‖row i of A⁻¹‖.
Each swap multiplies |det A| by ρ > f > 1, so the loop ends; it is also capped (``max_swaps``).
Everything runs in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def pivoted_qr(matrix: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Column-pivoted QR of ``matrix`` [m, n]: (R [min(m, n), n] upper triangular, permutation P of the n columns)
    with matrix[:, P] = Q R and |R_00| ≥ |R_11| ≥ …: each step takes the column of largest remaining norm."""
    work = matrix.detach().to(torch.float64).clone()
    rows, cols = work.shape
    order = list(range(cols))
    for step in range(min(rows, cols)):
        norms = work[step:, step:].square().sum(0)
        pivot = step + int(norms.argmax())
        if pivot != step:
            work[:, [step, pivot]] = work[:, [pivot, step]]
            order[step], order[pivot] = order[pivot], order[step]
        column = work[step:, step]
        alpha = column.norm()
        if alpha == 0:
            continue
        reflector = column.clone()
        reflector[0] += torch.sign(column[0]) * alpha if column[0] != 0 else alpha
        reflector /= reflector.norm()
        work[step:, step:] -= 2.0 * torch.outer(reflector, reflector @ work[step:, step:])
        work[step + 1 :, step] = 0.0
    return work[: min(rows, cols)].triu(), order


@dataclass
class RRQRResult:
    order: list[int]
    """The column permutation; its first k columns are the chosen ones."""
    swaps: int
    rho: float
    """max ρ_ij of the final split (≤ f unless ``swaps`` reached the cap, or the first k columns are rank deficient:
    then ``inf`` and no swap is made)."""


def _split_rho(r: torch.Tensor, k: int) -> torch.Tensor:
    """ρ [k, n-k] of the split of upper-triangular R [≥k, n] after k columns."""
    a, b = r[:k, :k], r[:k, k:]
    a_inv = torch.linalg.solve_triangular(a, torch.eye(k, dtype=r.dtype, device=r.device), upper=True)
    gamma = r[k:, k:].norm(dim=0) if r.shape[0] > k else torch.zeros(r.shape[1] - k, dtype=r.dtype)
    inv_omega = a_inv.norm(dim=1)  # 1 / ω_i
    return ((a_inv @ b).square() + torch.outer(inv_omega, gamma).square()).sqrt()


def strong_rrqr(matrix: torch.Tensor, k: int, f: float = 1.5, max_swaps: int = 20) -> RRQRResult:
    """Choose ``k`` of the n columns of ``matrix`` [m, n] (1 ≤ k ≤ min(m, n)): pivoted QR, then strong-RRQR swaps
    until max ρ ≤ ``f`` (> 1) or ``max_swaps`` swaps."""
    rows, cols = matrix.shape
    if not 1 <= k <= min(rows, cols):
        raise ValueError(f"k must lie in [1, {min(rows, cols)}], got {k}")
    r, order = pivoted_qr(matrix)
    if k == cols:
        return RRQRResult(order, 0, 0.0)
    scale = r[0, 0].abs()
    if scale == 0 or r[k - 1, k - 1].abs() <= 1e-12 * scale:  # rank < k: the pivoted columns already span it
        return RRQRResult(order, 0, float("inf"))
    swaps = 0
    while True:
        rho = _split_rho(r, k)
        worst = float(rho.max())
        if worst <= f or swaps == max_swaps:
            return RRQRResult(order, swaps, worst)
        i, j = divmod(int(rho.argmax()), cols - k)
        columns = list(range(cols))
        columns[i], columns[k + j] = columns[k + j], columns[i]
        order = [order[c] for c in columns]
        r = torch.linalg.qr(r[:, columns], mode="r").R  # the R of matrix[:, order], up to the signs of its rows
        swaps += 1
