"""Effective ranks and norms of a batch of state matrices, from their singular values."""

from __future__ import annotations

import torch

from .spectra import eigvalsh, kernel_available, spectral_metrics_triton

METRICS = ("threshold_rank", "stable_rank", "entropy_rank", "nuclear_norm", "frobenius_norm")
SPECTRA = ("auto", "svd", "gram")


def default_method(device: torch.device) -> str:
    """``gram`` on CUDA (svdvals is the bottleneck of calibration there), ``svd`` elsewhere."""
    return "gram" if torch.device(device).type == "cuda" else "svd"


def singular_values(states: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """Singular values of ``states`` [..., d_k, d_v] in descending order: [..., min(d_k, d_v)] float32.

    - ``svd``: ``torch.linalg.svdvals`` in float32;
    - ``gram``: sqrt of the eigenvalues of the smaller Gram matrix (SᵀS or SSᵀ) computed in float64, with the
      same threshold ranks as the SVD (float64 keeps the squared condition number resolvable; float32 eigenvalues
      would not). On CUDA the eigenvalues come from :mod:`compressor.spectra`'s Triton kernels;
    - ``auto``: ``gram`` on CUDA, ``svd`` elsewhere (on a CPU the two take the same time, and the SVD is exact).
    """
    method = resolve_method(method, states.device)
    if method == "svd":
        return torch.linalg.svdvals(states.float())
    return gram_singular_values(gram_matrices(states))


def resolve_method(method: str, device: torch.device) -> str:
    """``method`` checked against :data:`SPECTRA`, with ``auto`` replaced by :func:`default_method`."""
    if method not in SPECTRA:
        raise ValueError(f"unknown spectra method {method!r}; expected one of {SPECTRA}")
    return default_method(device) if method == "auto" else method


def gram_matrices(states: torch.Tensor) -> torch.Tensor:
    """The smaller Gram matrices (SᵀS or SSᵀ) of ``states`` [..., d_k, d_v], float64: [..., d, d], d = min(d_k, d_v)."""
    s = states.double()
    return s.mT @ s if s.shape[-1] <= s.shape[-2] else s @ s.mT


def gram_singular_values(gram: torch.Tensor) -> torch.Tensor:
    """Singular values [..., d] float32, descending, of the states whose Gram matrices are ``gram`` [..., d, d]."""
    return eigvalsh(gram).clamp_min(0).sqrt().flip(-1).float()


def state_metrics(states: torch.Tensor, eps: float = 1e-4, method: str = "auto") -> dict[str, torch.Tensor]:
    """Per-matrix metrics of ``states`` [..., d_k, d_v], each shaped [...] (float32): the columns of
    :func:`metric_table` by name."""
    return dict(zip(METRICS, metric_table(states, eps, method).unbind(-1)))


def metric_table(states: torch.Tensor, eps: float = 1e-4, method: str = "auto") -> torch.Tensor:
    """Per-matrix metrics of ``states`` [..., d_k, d_v]: [..., 5] float32, one column per name in :data:`METRICS`.

    - ``threshold_rank``: #{σ_i > eps·σ_1} (the State Rank paper's Eq. 6);
    - ``stable_rank``: ‖S‖_F² / ‖S‖_2² divided by min(d_k, d_v), in [0, 1];
    - ``entropy_rank``: exp(H(σ / Σσ)) (Roy & Vetterli);
    - ``nuclear_norm``: Σσ_i; ``frobenius_norm``: sqrt(Σσ_i²).
    The singular values come from :func:`singular_values` with ``method``. With ``gram`` on CUDA (d ≤ 128), the
    metrics come from the eigenvalues in float64 by :func:`compressor.spectra.spectral_metrics_triton`: a matrix
    product and four kernel launches instead of some twenty. A zero matrix has every metric 0.
    """
    size = min(states.shape[-2:])
    if resolve_method(method, states.device) == "gram":
        gram = gram_matrices(states)
        if kernel_available(gram):
            return spectral_metrics_triton(gram.flatten(0, -3), eps, size, overwrite=True).unflatten(
                0, states.shape[:-2])
        sigma = gram_singular_values(gram)
    else:
        sigma = singular_values(states, "svd")
    top = sigma[..., 0]
    nonzero = top > 0
    nuclear = sigma.sum(-1)
    frobenius_sq = sigma.pow(2).sum(-1)
    p = sigma / nuclear.clamp_min(torch.finfo(sigma.dtype).tiny)[..., None]
    entropy = -(p * torch.log(p.clamp_min(torch.finfo(sigma.dtype).tiny))).sum(-1)
    zero = torch.zeros_like(top)
    columns = {
        "threshold_rank": (sigma > eps * top[..., None]).sum(-1).float(),
        "stable_rank": torch.where(nonzero, frobenius_sq / top.clamp_min(1e-30).pow(2), zero) / size,
        "entropy_rank": torch.where(nonzero, entropy.exp(), zero),
        "nuclear_norm": nuclear,
        "frobenius_norm": frobenius_sq.sqrt(),
    }
    return torch.stack([columns[name] for name in METRICS], -1)
