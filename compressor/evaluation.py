"""Perplexity and the logit comparisons that check a pruned or reloaded model."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, batch_size: int = 4, progress: bool = True, desc: str = "") -> float:
    """exp(mean next-token negative log-likelihood) over every predicted token of ``tokens`` [N, L]."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in tqdm(tokens.split(batch_size), desc=desc or "perplexity", unit="batch", disable=not progress):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)


@torch.no_grad()
def logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Float32 logits [N, L, V] of ``tokens`` [N, L] on the model's device, returned on the CPU."""
    device = next(model.parameters()).device
    return model(input_ids=tokens.to(device), use_cache=False).logits.float().cpu()


def max_logit_difference(first: nn.Module, second: nn.Module, tokens: torch.Tensor) -> float:
    """Largest absolute difference between the two models' logits on ``tokens`` [N, L]."""
    return (logits(first, tokens) - logits(second, tokens)).abs().max().item()
