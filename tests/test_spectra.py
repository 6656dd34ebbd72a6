"""The Triton kernels of compressor.spectra, run by Triton's interpreter on CPU tensors (the GPU runs the same programs
compiled), against torch.linalg.eigvalsh, the SVD and the PyTorch metrics."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from test_metrics import adversarial_states

from compressor.metrics import METRICS, metric_table
from compressor.spectra import BISECTION_STEPS, GRID_OCTAVES, eigvalsh, eigvalsh_triton, kernel_available

pytest.importorskip("triton")

INTERPRETED = textwrap.dedent(
    """
    import sys, torch
    from compressor.spectra import eigvalsh_triton, spectral_metrics_triton
    matrices = torch.load(sys.argv[1])
    if sys.argv[3] == "eigenvalues":
        torch.save([eigvalsh_triton(m) for m in matrices], sys.argv[2])
    else:  # metrics at eps = 1e-4 of states of size n, as calibration asks for them: on a temporary, reduced in place
        tables = [spectral_metrics_triton(m.clone(), 1e-4, m.shape[-1], overwrite=True) for m in matrices]
        torch.save(tables, sys.argv[2])
    """
)


def interpreted(matrices: list[torch.Tensor], tmp_path, what: str = "eigenvalues") -> list[torch.Tensor]:
    """eigvalsh_triton (``what='eigenvalues'``) or spectral_metrics_triton (``'metrics'``) of each [M, n, n]
    float64 batch, in a process where Triton interprets the kernels."""
    (tmp_path / "run.py").write_text(INTERPRETED)
    torch.save(matrices, tmp_path / "in.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "run.py", "in.pt", "out.pt", what], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


def grams(states: torch.Tensor) -> torch.Tensor:
    s = states.double()
    return s.mT @ s


def bisection_error(n: int) -> float:
    """The bound on the kernels' relative error of an eigenvalue of an n × n matrix (padded to a power of two, at
    least 16): half the bracket after BISECTION_STEPS halvings, the bracket's width below (2^(GRID_OCTAVES / (n' - 1))
    - 1) times the eigenvalue."""
    padded = max(16, 1 << (n - 1).bit_length())
    return (2 ** (GRID_OCTAVES / (padded - 1)) - 1) * 2.0 ** -(BISECTION_STEPS + 1)


@pytest.mark.slow
def test_kernels_equal_eigvalsh_and_give_the_svd_threshold_ranks(tmp_path):
    rank_two = torch.zeros(16, 16)
    rank_two[0, 0], rank_two[1, 1] = 3.0, 4.0
    graded = torch.zeros(6, 6)
    graded[0, 0], graded[1, 1], graded[2, 2] = 1000.0, 0.2, 0.05  # σ_i / σ_1 = 1, 2e-4, 5e-5
    hand = torch.stack([torch.eye(16), torch.zeros(16, 16), rank_two])
    # 16: no padding, one block; 12: padded to 16; 32: two blocks (32, then 16)
    adversarial = [adversarial_states(count, d, seed) for count, d, seed in ((3, 16, 1), (2, 12, 2), (1, 32, 3))]
    dense = torch.randn(1, 32, 32, generator=torch.Generator().manual_seed(4))  # every column of both blocks matters
    batches = [grams(hand), grams(graded[None]), *map(grams, adversarial), grams(dense)]  # graded: 6, padded to 16
    results = interpreted(batches, tmp_path)

    expected = torch.tensor([[1.0] * 16, [0.0] * 16, [0.0] * 14 + [9.0, 16.0]], dtype=torch.float64)
    torch.testing.assert_close(results[0], expected, rtol=bisection_error(16), atol=1e-18)
    expected = torch.tensor([[0.0, 0.0, 0.0, 0.05**2, 0.2**2, 1000.0**2]], dtype=torch.float64)
    torch.testing.assert_close(results[1], expected, rtol=bisection_error(6), atol=1e-14 * 1000.0**2)
    for matrices, values in zip(batches, results):
        reference = torch.linalg.eigvalsh(matrices)
        assert values.shape == reference.shape
        top = reference[:, -1:]
        # the bisection's relative error, plus what both share: a few float64 ulps of the largest eigenvalue
        assert ((values - reference).abs() <= bisection_error(matrices.shape[-1]) * reference.abs() + 1e-14 * top).all()
    for states, values in zip(adversarial, results[2:5]):
        sigma = torch.linalg.svdvals(states.double())
        threshold = 1e-4 * sigma[:, :1]
        clear = ~((sigma - threshold).abs() < 1e-3 * threshold).any(-1)  # no σ within 0.1 % of the threshold
        assert clear.any()
        from_kernel = values.clamp_min(0).sqrt()
        ranks = (from_kernel > 1e-4 * from_kernel[:, -1:]).sum(-1)
        assert torch.equal(ranks[clear], (sigma > threshold).sum(-1)[clear])


def test_cpu_tensors_use_torch_and_large_matrices_are_refused():
    matrices = grams(torch.randn(3, 8, 8))
    assert not kernel_available(matrices)
    assert torch.equal(eigvalsh(matrices), torch.linalg.eigvalsh(matrices))
    with pytest.raises(ValueError, match="up to 128"):
        eigvalsh_triton(torch.zeros(1, 129, 129, dtype=torch.float64))


@pytest.mark.slow
def test_metrics_kernel_equals_the_pytorch_metrics(tmp_path):
    hand = torch.stack([torch.eye(16), torch.zeros(16, 16), torch.diag(torch.tensor([2.0, 1e-5, 0.5] + [0.0] * 13))])
    adversarial = [adversarial_states(count, d, seed) for count, d, seed in ((6, 16, 5), (3, 32, 6))]
    results = interpreted([grams(hand), *map(grams, adversarial)], tmp_path, "metrics")

    identity, zero, graded = results[0]
    assert identity.tolist() == pytest.approx([16, 1.0, 16, 16, 4.0], rel=1e-6)
    assert zero.tolist() == [0.0] * 5
    sigma = torch.tensor([2.0, 0.5, 1e-5], dtype=torch.float64)  # σ_3 / σ_1 = 5e-6: below the threshold
    p = sigma / sigma.sum()
    expected = [2, sigma.pow(2).sum() / 4 / 16, (-(p * p.log()).sum()).exp(), sigma.sum(), sigma.pow(2).sum().sqrt()]
    assert graded.tolist() == pytest.approx([float(value) for value in expected], rel=1e-6)
    for states, table in zip(adversarial, results[1:]):
        reference = metric_table(states, method="svd")  # torch.linalg.svdvals, metrics in PyTorch
        sigma = torch.linalg.svdvals(states.double())
        threshold = 1e-4 * sigma[:, :1]
        clear = ~((sigma - threshold).abs() < 1e-3 * threshold).any(-1)  # no σ within 0.1 % of the threshold
        assert clear.float().mean() > 0.6
        column = METRICS.index("threshold_rank")
        assert torch.equal(table[clear, column], reference[clear, column])
        others = [i for i in range(len(METRICS)) if i != column]
        torch.testing.assert_close(table[:, others], reference[:, others], rtol=2e-5, atol=0)
