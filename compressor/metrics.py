"""Effective ranks and norms of a batch of state matrices, from their singular values."""

from __future__ import annotations

import torch

METRICS = ("threshold_rank", "stable_rank", "entropy_rank", "nuclear_norm", "frobenius_norm")


def state_metrics(states: torch.Tensor, eps: float = 1e-4) -> dict[str, torch.Tensor]:
    """Per-matrix metrics of ``states`` [..., d_k, d_v], each shaped [...] (float32).

    - ``threshold_rank``: #{σ_i > eps·σ_1} (the State Rank paper's Eq. 6), computed from float32 singular values;
    - ``stable_rank``: ‖S‖_F² / ‖S‖_2² divided by min(d_k, d_v), in [0, 1];
    - ``entropy_rank``: exp(H(σ / Σσ)) (Roy & Vetterli);
    - ``nuclear_norm``: Σσ_i; ``frobenius_norm``: sqrt(Σσ_i²).
    A zero matrix has every metric 0.
    """
    sigma = torch.linalg.svdvals(states.float())
    top = sigma[..., 0]
    nonzero = top > 0
    nuclear = sigma.sum(-1)
    frobenius_sq = sigma.pow(2).sum(-1)
    p = sigma / nuclear.clamp_min(torch.finfo(sigma.dtype).tiny)[..., None]
    entropy = -(p * torch.log(p.clamp_min(torch.finfo(sigma.dtype).tiny))).sum(-1)
    zero = torch.zeros_like(top)
    return {
        "threshold_rank": (sigma > eps * top[..., None]).sum(-1).float(),
        "stable_rank": torch.where(nonzero, frobenius_sq / top.clamp_min(1e-30).pow(2), zero) / min(states.shape[-2:]),
        "entropy_rank": torch.where(nonzero, entropy.exp(), zero),
        "nuclear_norm": nuclear,
        "frobenius_norm": frobenius_sq.sqrt(),
    }
