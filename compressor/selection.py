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
from tqdm.auto import tqdm

from .budgets import Budget
from .calibration import StateStatistics
from .evaluation import next_token_loss, token_losses
from .families import Family
from .scoring import score_heads
from .settings import LOSS_SEQ_LEN, LOSS_WINDOWS, SCORE_METHODS, held_out_count
from .layers import PruningPlan, linear_layers

RANDOM_SEEDS = 3


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


@contextmanager
def masked_channels(model: nn.Module, family: Family, channels: dict[int, dict[int, list[int]]]):
    """Within the block, every value head's queries and keys keep only the channels ``channels[layer][key head]``
    lists for the key head it reads (the others are zeroed where the layer has just applied its convolution and
    activation: fla layers as they split heads, before feature maps and DeltaNet's sum norm; the others as the
    recurrence receives them, before its L2 norm), at the source's d_k and query scale. Removing those channels
    computes the same (tests/test_key_channels.py). Layers missing from ``channels`` keep every channel."""
    mixers = linear_layers(model, family)
    masks = {}
    for index, kept in channels.items():
        mixer = mixers[index]
        masks[index] = torch.zeros(mixer.num_k_heads, mixer.head_k_dim, device=mixer.out_proj.weight.device)
        for key, kept_channels in kept.items():
            masks[index][int(key), kept_channels] = 1
    with channel_masks(model, family, masks):
        yield model


@contextmanager
def channel_masks(model: nn.Module, family: Family, masks: dict[int, torch.Tensor]):
    """Within the block, the queries and keys of every value head are multiplied channel by channel by
    ``masks[layer]`` [H_k, d_k] at the key head it reads, where ``masked_channels`` zeroes them (the masks may
    require gradients). Layers missing from ``masks`` are left alone."""
    mixers = linear_layers(model, family)
    wrapped = []
    try:
        for index, mask in masks.items():
            mixer = mixers[index]
            reads = torch.tensor(mixer.value_to_key, device=mask.device)  # [H_v]: the key head of each value head
            if hasattr(mixer, "heads"):
                def heads(q, k, v, _inner=mixer.heads, _mask=mask, _reads=reads):
                    q, k, v = _inner(q, k, v)
                    per_value = _mask[_reads]  # [H_v, d_k], gathered at every call (a fresh graph for gradients)
                    return q * per_value.to(q.dtype), k * per_value.to(k.dtype), v
                mixer.heads = heads
                wrapped.append((mixer, "heads"))
            else:
                def recurrence(q, k, *args, _inner=mixer.recurrence, _mask=mask, _reads=reads, **kwargs):
                    per_value = _mask[_reads]
                    return _inner(q * per_value.to(q.dtype), k * per_value.to(k.dtype), *args, **kwargs)
                mixer.recurrence = recurrence
                wrapped.append((mixer, "recurrence"))
        yield model
    finally:
        for mixer, name in wrapped:
            del mixer.__dict__[name]


def loss_windows(tokens: torch.Tensor, samples: int = LOSS_WINDOWS, seq_len: int = LOSS_SEQ_LEN) -> torch.Tensor:
    """The ``loss`` scorer's text: the first ``samples`` windows of ``tokens`` [N, L], cut to ``seq_len`` tokens:
    [≤samples, ≤seq_len]."""
    return tokens[:samples, :seq_len]


@contextmanager
def replica_head_masks(model: nn.Module, family: Family):
    """Let every sequence of a batch mask its own heads.

    Yields a function ``set_masks(masks)`` taking layer -> [B, H] (1 keeps the head, 0 masks it); until the next
    call, a forward pre-hook on each mixer's ``out_proj`` multiplies its input [B, T, H·d_v] by that layer's row
    mask, repeated over each head's d_v columns. Multiplying a head's output by 0 is exactly zeroing its
    ``out_proj`` columns (``masked_heads``), per sequence.
    """
    mixers = linear_layers(model, family)
    current: dict[int, torch.Tensor] = {}

    def hook_for(layer: int, mixer: nn.Module):
        def hook(module, args):
            mask = current[layer].to(args[0].device, args[0].dtype).repeat_interleave(mixer.head_v_dim, dim=1)
            return (args[0] * mask[:, None, :], *args[1:])

        return hook

    handles = [mixer.out_proj.register_forward_pre_hook(hook_for(layer, mixer)) for layer, mixer in mixers.items()]
    try:
        yield current.update
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def loss_scores(model: nn.Module, family: Family, tokens: torch.Tensor, batch_size: int = 16,
                progress: bool = False) -> dict[int, torch.Tensor]:
    """Layer -> [H] increase of the mean next-token loss on ``tokens`` [N, L] when that head alone is masked.

    Batched: every (head, window) pair, plus one unmasked copy of each window for the baseline, is one sequence
    of a batch, and each sequence masks its own head (``replica_head_masks``). So the cost is
    ceil((heads + 1) × N / ``batch_size``) forward passes of [≤ ``batch_size``, L] tokens — for 1,000 heads, 2
    windows of 256 tokens and batches of 16, 126 passes of 16 × 256 tokens — instead of one pass per head.
    Heads interact, so masking several heads in the *same* sequence would not give each one's effect; here no
    sequence masks more than one. The figures equal the one-head-at-a-time definition up to float rounding.
    """
    mixers = linear_layers(model, family)
    heads = [(layer, head) for layer, mixer in mixers.items() for head in range(mixer.num_v_heads)]
    units = [(unit, window) for unit in [None, *heads] for window in range(tokens.shape[0])]
    device = next(model.parameters()).device
    row_loss = torch.zeros(len(units), dtype=torch.float64)
    with replica_head_masks(model, family) as set_masks:
        for start in tqdm(range(0, len(units), batch_size), desc="loss scores", unit="batch", disable=not progress):
            batch = units[start : start + batch_size]
            masks = {layer: torch.ones(len(batch), mixer.num_v_heads) for layer, mixer in mixers.items()}
            for row, (unit, _) in enumerate(batch):
                if unit is not None:
                    masks[unit[0]][row, unit[1]] = 0
            set_masks(masks)
            ids = tokens[[window for _, window in batch]].to(device)
            row_loss[start : start + len(batch)] = token_losses(model, ids).double().sum(1).cpu()
    mean_loss = row_loss.view(len(heads) + 1, tokens.shape[0]).sum(1) / tokens[:, 1:].numel()  # [1 + heads]
    increases = (mean_loss[1:] - mean_loss[0]).float()
    return {layer: increases[[i for i, (l, _) in enumerate(heads) if l == layer]] for layer in mixers}


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
    rules = [(method, score_heads(stats, method, alpha)) for method in SCORE_METHODS if method != "random"]
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
    budget: Budget,
    alpha: float = 0.5,
    seed: int = 0,
    batch_size: int = 4,
) -> tuple[Candidate, list[Candidate]]:
    """Plan every candidate rule within ``budget``, measure each plan's next-token loss on ``held_out`` [N, L]
    with its heads masked, and return (the lowest-loss candidate, every candidate in the order tried; ties go to the first)."""
    candidates = []
    for name, remove, candidate_seed, scores in candidate_scores(stats, loss, alpha, seed):
        plan = budget.plan(scores, head_bytes, remove)
        candidate = Candidate(name, remove, candidate_seed, scores, plan)
        with masked_heads(model, family, plan.kept):
            candidate.loss = next_token_loss(model, held_out, batch_size, progress=False)
        candidates.append(candidate)
    return min(candidates, key=lambda c: c.loss), candidates
