"""The rank-revealing QR that chooses query/key channels: pivoted QR, then strong-RRQR swaps."""

from __future__ import annotations

import math

import pytest
import torch

from compressor.rrqr import _split_rho, pivoted_qr, strong_rrqr


def kahan(n: int, c: float = 0.285, tau: float = 1e-7) -> torch.Tensor:
    """Kahan's matrix, on which column pivoting keeps the natural order and misses a small last pivot."""
    s = math.sqrt(1 - c * c)
    upper = torch.triu(-c * torch.ones(n, n, dtype=torch.float64), 1) + torch.eye(n, dtype=torch.float64)
    rows = torch.tensor([s**i for i in range(n)], dtype=torch.float64)
    columns = torch.tensor([(1 - tau) ** i for i in range(n)], dtype=torch.float64)
    return rows[:, None] * upper * columns


def smallest_singular_value(matrix: torch.Tensor, columns: list[int]) -> float:
    return torch.linalg.svdvals(matrix[:, columns])[-1].item()


def test_pivoted_qr_factors_the_permuted_matrix_with_falling_pivots():
    matrix = torch.randn(50, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    matrix[:, 3] *= 10
    r, order = pivoted_qr(matrix)
    assert order[0] == 3 and sorted(order) == list(range(12))
    permuted = matrix[:, order]
    torch.testing.assert_close(r.T @ r, permuted.T @ permuted)  # R is the R of matrix[:, order]
    assert torch.equal(r, r.triu())
    diagonal = r.diagonal().abs()
    assert (diagonal[:-1] >= diagonal[1:]).all()


def test_pivoted_qr_matches_scipy():
    from scipy import linalg  # in the test extra
    matrix = torch.randn(40, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r, order = pivoted_qr(matrix)
    _, r_scipy, order_scipy = linalg.qr(matrix.numpy(), pivoting=True, mode="economic")
    assert order == list(order_scipy)
    torch.testing.assert_close(r.abs(), torch.from_numpy(r_scipy).abs())


def test_it_picks_a_known_well_conditioned_subset():
    """Columns 1, 4, 7, 9 are orthonormal; every other column is a small combination of them."""
    generator = torch.Generator().manual_seed(2)
    basis = torch.linalg.qr(torch.randn(300, 4, generator=generator, dtype=torch.float64)).Q
    subset = [1, 4, 7, 9]
    others = [c for c in range(12) if c not in subset]
    matrix = torch.empty(300, 12, dtype=torch.float64)
    matrix[:, subset] = basis
    matrix[:, others] = basis @ (torch.rand(4, len(others), generator=generator, dtype=torch.float64) - 0.5) * 0.6
    result = strong_rrqr(matrix, 4)
    assert sorted(result.order[:4]) == subset
    assert result.rho <= 1.5


def test_swaps_fix_what_pivoting_misses():
    """On Kahan's matrix pivoting alone keeps a nearly singular set; the swaps reach the best possible σ_k."""
    matrix = kahan(40)
    k = 39
    _, pivoted = pivoted_qr(matrix)
    result = strong_rrqr(matrix, k)
    assert result.swaps >= 1
    best = torch.linalg.svdvals(matrix)[k - 1].item()
    assert smallest_singular_value(matrix, pivoted[:k]) < 1e-3 * best
    assert smallest_singular_value(matrix, result.order[:k]) > 0.5 * best


@pytest.mark.parametrize("seed", range(4))
def test_the_result_meets_the_bound_or_the_swap_limit(seed):
    """Rows of decaying scale (like activations): the returned ρ is that of the returned order, and ≤ f unless the
    swap limit was reached."""
    generator = torch.Generator().manual_seed(seed)
    decay = torch.exp(-0.3 * torch.arange(32, dtype=torch.float64))
    matrix = torch.randn(400, 32, generator=generator, dtype=torch.float64) * decay
    matrix = matrix @ torch.randn(32, 32, generator=generator, dtype=torch.float64)
    for f, max_swaps in ((1.5, 20), (1.01, 2)):
        result = strong_rrqr(matrix, 16, f=f, max_swaps=max_swaps)
        assert sorted(result.order) == list(range(32))
        r = torch.linalg.qr(matrix[:, result.order], mode="r").R
        assert math.isclose(_split_rho(r, 16).max().item(), result.rho, rel_tol=1e-6)
        assert result.rho <= f or result.swaps == max_swaps


def test_bad_k_is_refused():
    with pytest.raises(ValueError):
        strong_rrqr(torch.ones(5, 3), 4)
