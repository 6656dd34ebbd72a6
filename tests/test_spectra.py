"""The Triton eigenvalue kernels of compressor.spectra, run by Triton's interpreter on CPU tensors (the GPU runs
the same programs compiled), against torch.linalg.eigvalsh and the SVD."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from test_metrics import adversarial_states

from compressor.spectra import eigvalsh, eigvalsh_triton, kernel_available

pytest.importorskip("triton")

INTERPRETED = textwrap.dedent(
    """
    import sys, torch
    from compressor.spectra import eigvalsh_triton
    matrices = torch.load(sys.argv[1])
    torch.save([eigvalsh_triton(m) for m in matrices], sys.argv[2])
    """
)


def interpreted_eigvalsh(matrices: list[torch.Tensor], tmp_path) -> list[torch.Tensor]:
    """eigvalsh_triton of each [M, n, n] float64 batch, in a process where Triton interprets the kernels."""
    (tmp_path / "run.py").write_text(INTERPRETED)
    torch.save(matrices, tmp_path / "in.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "run.py", "in.pt", "out.pt"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


def grams(states: torch.Tensor) -> torch.Tensor:
    s = states.double()
    return s.mT @ s


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
    results = interpreted_eigvalsh(batches, tmp_path)

    expected = torch.tensor([[1.0] * 16, [0.0] * 16, [0.0] * 14 + [9.0, 16.0]], dtype=torch.float64)
    torch.testing.assert_close(results[0], expected, rtol=0, atol=1e-12)
    expected = torch.tensor([[0.0, 0.0, 0.0, 0.05**2, 0.2**2, 1000.0**2]], dtype=torch.float64)
    torch.testing.assert_close(results[1], expected, rtol=0, atol=1e-14 * 1000.0**2)
    for matrices, values in zip(batches, results):
        reference = torch.linalg.eigvalsh(matrices)
        assert values.shape == reference.shape
        top = reference[:, -1:].clamp_min(1e-280)  # a zero matrix: eigenvalues within the bisection's 1e-300 margin
        assert ((values - reference).abs() <= 1e-13 * top).all()  # a few float64 ulps of the largest eigenvalue
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
