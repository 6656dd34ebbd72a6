"""State metrics on matrices whose spectra are known by hand."""

import math

import pytest
import torch

from compressor.metrics import default_method, singular_values, state_metrics


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


def adversarial_states(count: int, d: int, seed: int) -> torch.Tensor:
    """[count, d, d] float32 states of random rank, singular values log-uniform in 1e-6…1 (≈4 per matrix placed
    within ±0.2…5 % of the threshold 1e-4·σ_1), random scale 1e-3…1e3, plus noise 1e-7·scale."""
    g = torch.Generator().manual_seed(seed)
    rank = torch.randint(2, d + 1, (count,), generator=g)
    spread = 10 ** torch.empty(count, d).uniform_(-6, 0, generator=g)
    sign = torch.randint(0, 2, (count, d), generator=g) * 2 - 1
    near = 1e-4 * (1 + sign * torch.empty(count, d).uniform_(2e-3, 5e-2, generator=g))
    sigma = torch.where(torch.rand(count, d, generator=g) < 4 / d, near, spread)
    sigma[:, 0] = 1.0
    sigma = torch.where(torch.arange(d) < rank[:, None], sigma, torch.zeros(())).double()
    u, _ = torch.linalg.qr(torch.randn(count, d, d, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(count, d, d, generator=g, dtype=torch.float64))
    scale = 10 ** torch.empty(count, 1, 1, dtype=torch.float64).uniform_(-3, 3, generator=g)
    noise = 1e-7 * torch.randn(count, d, d, generator=g, dtype=torch.float64)
    return (scale * ((u * sigma[:, None, :]) @ v.mT + noise)).float()


@pytest.mark.parametrize(("count", "d"), [(512, 32), (32, 128)])
def test_gram_spectra_give_the_svd_threshold_ranks_on_adversarial_states(count, d):
    states = adversarial_states(count, d, seed=d)
    exact = torch.linalg.svdvals(states.double())
    threshold = 1e-4 * exact[:, :1]
    ambiguous = ((exact - threshold).abs() < 1e-3 * threshold).any(-1)  # a σ within 0.1 % of the threshold
    assert ambiguous.float().mean() < 0.05
    kept = states[~ambiguous]
    svd, gram = state_metrics(kept, method="svd"), state_metrics(kept, method="gram")
    assert torch.equal(svd["threshold_rank"], gram["threshold_rank"])
    assert torch.equal(svd["threshold_rank"], (exact > threshold).sum(-1)[~ambiguous].float())
    assert svd["threshold_rank"].unique().numel() > 10  # the states really span many ranks
    for name in ("stable_rank", "entropy_rank", "nuclear_norm", "frobenius_norm"):
        assert torch.allclose(svd[name], gram[name], rtol=1e-5, atol=0), name
    # The states are adversarial: float32 Gram eigenvalues get most threshold ranks wrong.
    s = kept.mT @ kept
    float32 = torch.linalg.eigvalsh(s).clamp_min(0).sqrt()
    wrong = (float32 > 1e-4 * float32[:, -1:]).sum(-1) != svd["threshold_rank"]
    assert wrong.float().mean() > 0.5


@pytest.mark.parametrize("shape", [(4, 6), (6, 4)])
def test_gram_path_on_hand_computed_matrices_uses_the_smaller_side(shape):
    rank_two = torch.zeros(shape)
    rank_two[0, 0], rank_two[1, 1] = 3.0, 4.0
    graded = torch.zeros(shape)
    graded[0, 0], graded[1, 1], graded[2, 2] = 1000.0, 0.2, 0.05  # σ_i / σ_1 = 1, 2e-4, 5e-5
    states = torch.stack([torch.eye(*shape), torch.zeros(shape), rank_two, graded])
    assert singular_values(states, "gram").shape == (4, 4)
    m = state_metrics(states, method="gram")
    assert m["threshold_rank"].tolist() == [4, 0, 2, 2]
    assert torch.allclose(m["nuclear_norm"], torch.tensor([4.0, 0.0, 7.0, 1000.25]))
    assert torch.allclose(m["stable_rank"][:3], torch.tensor([1.0, 0.0, 25 / 16 / 4]))
    assert torch.allclose(singular_values(states, "gram"), torch.linalg.svdvals(states), atol=1e-5)


def test_auto_uses_gram_on_cuda_and_svd_elsewhere():
    assert default_method(torch.device("cuda", 0)) == "gram"
    assert default_method("cuda") == "gram"
    assert default_method(torch.device("cpu")) == "svd"
    states = torch.randn(8, 16, 16)
    assert torch.equal(singular_values(states), torch.linalg.svdvals(states))
    with pytest.raises(ValueError, match="spectra"):
        singular_values(states, "eig")


def test_gram_and_svd_threshold_ranks_on_exactly_rank_deficient_and_ill_conditioned_states():
    g = torch.Generator().manual_seed(5)
    rank_three = torch.randn(64, 96, 3, generator=g) @ torch.randn(64, 3, 80, generator=g)  # rank 3, float32 noise
    for method in ("svd", "gram"):
        assert state_metrics(rank_three, method=method)["threshold_rank"].tolist() == [3.0] * 64, method
    # σ_i = 10^(-8i/31): 16 of them above 1e-4·σ_1, the nearest 35 % away from it; at scales 1e-15…1e15
    sigma = torch.logspace(0, -8, 32, dtype=torch.float64)
    u, _ = torch.linalg.qr(torch.randn(9, 48, 32, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(9, 32, 32, generator=g, dtype=torch.float64))
    scale = torch.logspace(-15, 15, 9, dtype=torch.float64)[:, None, None]
    states = (scale * (u * sigma) @ v.mT).float()  # [9, 48, 32], condition number 1e8
    for method in ("svd", "gram"):
        m = state_metrics(states, method=method)
        assert m["threshold_rank"].tolist() == [16.0] * 9, method
        assert torch.allclose(m["nuclear_norm"].double(), scale.flatten() * sigma.sum(), rtol=1e-5)
