"""State metrics on matrices whose spectra are known by hand."""

import math

import torch

from compressor.metrics import state_metrics


def test_identity_zero_and_rank_deficient_matrices():
    rank_two = torch.zeros(4, 6)
    rank_two[0, 0], rank_two[1, 1] = 3.0, 4.0
    states = torch.stack([torch.eye(4, 6), torch.zeros(4, 6), rank_two])
    m = state_metrics(states)
    assert m["threshold_rank"].tolist() == [4, 0, 2]
    assert torch.allclose(m["nuclear_norm"], torch.tensor([4.0, 0.0, 7.0]))
    assert torch.allclose(m["frobenius_norm"], torch.tensor([2.0, 0.0, 5.0]))
    assert torch.allclose(m["stable_rank"], torch.tensor([1.0, 0.0, 25 / 16 / 4]))
    p = torch.tensor([3 / 7, 4 / 7])
    assert torch.allclose(m["entropy_rank"], torch.tensor([4.0, 0.0, math.exp(-(p * p.log()).sum().item())]))


def test_threshold_is_relative_to_the_largest_singular_value():
    diagonal = torch.diag(torch.tensor([1.0, 2e-4, 5e-5]))
    assert state_metrics(diagonal[None])["threshold_rank"].item() == 2
    assert state_metrics(diagonal[None], eps=1e-5)["threshold_rank"].item() == 3
    assert state_metrics(1000 * diagonal[None])["threshold_rank"].item() == 2
