"""Choose heads by measured loss: masking heads in place, the ``loss`` scorer and the ``auto`` method.

Masking a value head (zeroing its ``out_proj`` columns) gives exactly the model with that head removed, so
candidate plans can be compared on held-out text without slicing anything.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .calibration import StateStatistics
from .errors import CompressorError
from .evaluation import next_token_loss
from .families import Family
from .scoring import METHODS, plan_by_budget, score_heads
from .slicing import PruningPlan, linear_layers

LOSS_WINDOWS = 2
LOSS_SEQ_LEN = 256
RANDOM_SEEDS = 3
PRUNE_METHODS = (*METHODS, "loss", "auto")


@contextmanager
def masked_heads(model: nn.Module, family: Family, kept: dict[int, list[int]]):
    """Zero, in place, the ``out_proj`` columns [hidden, d_v] of every value head not in ``kept[layer]`` (layers
    missing from ``kept`` keep every head); restore the saved columns bit for bit on exit."""
    saved = []
    try:
        with torch.no_grad():
            for layer, mixer in linear_layers(model, family).items():
                width, weight = mixer.head_v_dim, mixer.out_proj.weight
                for head in sorted(set(range(mixer.num_v_heads)) - set(kept.get(layer, range(mixer.num_v_heads)))):
                    columns = slice(head * width, (head + 1) * width)
                    saved.append((weight, columns, weight[:, columns].clone()))
                    weight[:, columns] = 0
        yield model
    finally:
        with torch.no_grad():
            for weight, columns, original in saved:
                weight[:, columns] = original


def loss_windows(tokens: torch.Tensor) -> torch.Tensor:
    """The ``loss`` scorer's text: the first 2 windows of ``tokens`` [N, L], cut to 256 tokens: [≤2, ≤256]."""
    return tokens[:LOSS_WINDOWS, :LOSS_SEQ_LEN]


def loss_scores(model: nn.Module, family: Family, tokens: torch.Tensor, batch_size: int = 4) -> dict[int, torch.Tensor]:
    """Layer -> [H] increase of the mean next-token loss on ``tokens`` [N, L] when that head alone is masked.

    Costs one forward pass over ``tokens`` per head (heads interact, so masking several at once would not give
    each one's effect); keep ``tokens`` short (``loss_windows``).
    """
    base = next_token_loss(model, tokens, batch_size, progress=False)
    scores = {}
    for layer, mixer in linear_layers(model, family).items():
        heads = range(mixer.num_v_heads)
        increases = []
        for head in heads:
            with masked_heads(model, family, {layer: [h for h in heads if h != head]}):
                increases.append(next_token_loss(model, tokens, batch_size, progress=False) - base)
        scores[layer] = torch.tensor(increases)
    return scores


def held_out_count(samples: int, holdout: float) -> int:
    """How many of ``samples`` windows ``auto`` holds out: ceil(holdout · samples), leaving at least one to score."""
    if not 0.0 < holdout < 1.0:
        raise CompressorError(f"--auto-holdout must lie strictly between 0 and 1, got {holdout}.")
    held = math.ceil(holdout * samples)
    if held >= samples:
        raise CompressorError(
            f"--method auto needs calibration windows both to score and to hold out, but {samples} window(s) with "
            f"--auto-holdout {holdout} leave none to score; raise --samples."
        )
    return held


def split_windows(tokens: torch.Tensor, holdout: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scoring [N − k, L], held-out [k, L]) windows of ``tokens`` [N, L], k = ``held_out_count(N, holdout)``."""
    held = held_out_count(tokens.shape[0], holdout)
    return tokens[: tokens.shape[0] - held], tokens[tokens.shape[0] - held :]


@dataclass
class Candidate:
    """One rule's plan and its held-out next-token loss (nats) and perplexity."""

    name: str
    remove: str
    seed: int | None
    scores: dict[int, torch.Tensor]
    plan: PruningPlan
    loss: float = math.nan

    def summary(self) -> dict:
        return {"name": self.name, "remove": self.remove, "seed": self.seed, "loss": round(self.loss, 6),
                "perplexity": round(math.exp(self.loss), 4)}


def candidate_scores(
    stats: StateStatistics, loss: dict[int, torch.Tensor], alpha: float, seed: int
) -> list[tuple[str, str, int | None, dict[int, torch.Tensor]]]:
    """(name, remove, seed, scores) of every rule × both ends, ``loss`` × both ends, and random with 3 seeds."""
    rules = [(method, score_heads(stats, method, alpha)) for method in METHODS if method != "random"]
    rules.append(("loss", loss))
    found = [(name, end, None, scores) for name, scores in rules for end in ("high", "low")]
    found += [("random", "high", s, score_heads(stats, "random", seed=s)) for s in range(seed, seed + RANDOM_SEEDS)]
    return found


def choose_plan(
    model: nn.Module,
    family: Family,
    stats: StateStatistics,
    loss: dict[int, torch.Tensor],
    held_out: torch.Tensor,
    head_bytes: dict[int, int],
    state_reduction: float,
    min_heads_per_layer: int = 1,
    alpha: float = 0.5,
    seed: int = 0,
    batch_size: int = 4,
) -> tuple[Candidate, list[Candidate]]:
    """Plan every candidate rule, measure each plan's next-token loss on ``held_out`` [N, L] with its heads
    masked, and return (the lowest-loss candidate, every candidate in the order tried; ties go to the first)."""
    candidates = []
    for name, remove, candidate_seed, scores in candidate_scores(stats, loss, alpha, seed):
        plan = plan_by_budget(scores, head_bytes, state_reduction, remove, min_heads_per_layer)
        candidate = Candidate(name, remove, candidate_seed, scores, plan)
        with masked_heads(model, family, plan.kept):
            candidate.loss = next_token_loss(model, held_out, batch_size, progress=False)
        candidates.append(candidate)
    return min(candidates, key=lambda c: c.loss), candidates
