"""Score heads from their state statistics and turn a state-memory budget into a pruning plan."""

from __future__ import annotations

import math

import torch

from .calibration import StateStatistics
from .errors import CompressorError
from .settings import REMOVE, SCORE_METHODS
from .slicing import PruningPlan

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


def check_budget_options(state_reduction: float, min_heads_per_layer: int) -> None:
    if not 0.0 < state_reduction < 1.0:
        raise CompressorError(f"--state-reduction must lie strictly between 0 and 1, got {state_reduction}.")
    if min_heads_per_layer < 1:
        raise CompressorError(f"--min-heads-per-layer must be at least 1, got {min_heads_per_layer}.")


def check_budget(head_counts: dict[int, int], head_bytes: dict[int, int], state_reduction: float,
                 min_heads_per_layer: int = 1, protect_layers: tuple[int, ...] = ()) -> None:
    """Refuse a budget that no choice of heads can meet (checked before any calibration)."""
    check_budget_options(state_reduction, min_heads_per_layer)
    total = sum(head_bytes[layer] * count for layer, count in head_counts.items())
    freeable = sum(head_bytes[layer] * max(count - min_heads_per_layer, 0) for layer, count in head_counts.items()
                   if layer not in protect_layers)
    if freeable < math.ceil(state_reduction * total - 1e-9):
        protected = f" and leaving layers {', '.join(map(str, protect_layers))} whole" if protect_layers else ""
        raise CompressorError(
            f"a state reduction of {state_reduction:.1%} cannot be met while keeping {min_heads_per_layer} head(s) "
            f"per layer{protected}; at most {freeable / total:.1%} is possible."
        )


def plan_by_budget(
    scores: dict[int, torch.Tensor],
    head_bytes: dict[int, int],
    state_reduction: float,
    remove: str = "high",
    min_heads_per_layer: int = 1,
    protect_layers: tuple[int, ...] = (),
) -> PruningPlan:
    """Remove heads in score order (highest first for ``remove='high'``) until the recurrent-state bytes fall by
    at least ``state_reduction``, never leaving a layer with fewer than ``min_heads_per_layer`` heads and never
    touching ``protect_layers``.

    ``head_bytes[layer]`` is the size of one head's state in that layer. Ties break by (layer, head).
    """
    if remove not in REMOVE:
        raise CompressorError(f"--remove must be 'high' or 'low', got '{remove}'.")
    check_budget({layer: len(s) for layer, s in scores.items()}, head_bytes, state_reduction, min_heads_per_layer,
                 protect_layers)
    total = sum(head_bytes[layer] * len(s) for layer, s in scores.items())
    target = math.ceil(state_reduction * total - 1e-9)
    sign = -1.0 if remove == "high" else 1.0
    order = sorted(
        ((layer, head) for layer, s in scores.items() if layer not in protect_layers for head in range(len(s))),
        key=lambda lh: (sign * float(scores[lh[0]][lh[1]]), lh[0], lh[1]),
    )
    kept = {layer: set(range(len(s))) for layer, s in scores.items()}
    removed, freed = [], 0
    for layer, head in order:
        if freed >= target:
            break
        if len(kept[layer]) <= min_heads_per_layer:
            continue
        kept[layer].discard(head)
        removed.append((layer, head))
        freed += head_bytes[layer]
    return PruningPlan(kept={layer: sorted(heads) for layer, heads in kept.items()}, removed_by_rule=removed)
