"""Score heads from their state statistics."""

from __future__ import annotations

import torch

from .calibration import StateStatistics
from .errors import CompressorError
from .settings import SCORE_METHODS

#: Statistics-based scores: method name -> the state metric it averages over time.
METRIC_OF = {
    "rank": "threshold_rank",
    "stable_rank": "stable_rank",
    "entropy_rank": "entropy_rank",
    "norm": "nuclear_norm",
    "frobenius": "frobenius_norm",
}
RANK_METRICS = ("threshold_rank", "stable_rank", "entropy_rank")


def check_method(method: str, alpha: float, allowed: tuple[str, ...] = SCORE_METHODS) -> None:
    if method not in allowed:
        raise CompressorError(f"unknown method '{method}'; choose one of {', '.join(allowed)}.")
    if not 0.0 <= alpha <= 1.0:
        raise CompressorError(f"--alpha must lie in [0, 1], got {alpha}.")


def score_heads(stats: StateStatistics, method: str, alpha: float = 0.5, seed: int = 0) -> dict[int, torch.Tensor]:
    """Layer index -> score per value head [H].

    - ``joint``: the State Rank paper's Joint Rank-Norm score (Eq. 14),
      α · mean_t(rank_h) / d + (1 − α) · mean_t(‖S_h‖_*) / max_h'(mean_t(‖S_h'‖_*)),
      d = min(d_k, d_v) of the head's layer and the maximum taken over every head of the model;
    - ``rank``, ``stable_rank``, ``entropy_rank``: mean_t of that rank / d;
    - ``norm`` (nuclear), ``frobenius``: mean_t of that norm / its maximum over every head of the model;
    - ``random``: uniform scores drawn with ``seed``.
    """
    check_method(method, alpha)
    if method == "random":
        generator = torch.Generator().manual_seed(seed)
        return {layer: torch.rand(stats.heads[i], generator=generator) for i, layer in enumerate(stats.layers)}
    if method == "joint":
        rank_part, norm_part = _normalised(stats, "threshold_rank"), _normalised(stats, "nuclear_norm")
        return {layer: alpha * rank_part[layer] + (1 - alpha) * norm_part[layer] for layer in stats.layers}
    return _normalised(stats, METRIC_OF[method])


def _normalised(stats: StateStatistics, metric: str) -> dict[int, torch.Tensor]:
    """Layer -> [H] time-averaged ``metric``, ranks divided by their layer's min(d_k, d_v), norms by the model's
    largest head."""
    values = stats.per_layer(metric)
    if metric in RANK_METRICS:
        return {layer: values[layer] / float(min(stats.state_shapes[i])) for i, layer in enumerate(stats.layers)}
    largest = max(float(v.max()) for v in values.values()) or 1.0
    return {layer: values[layer] / largest for layer in stats.layers}
