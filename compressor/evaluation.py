"""Next-token loss, perplexity, an in-context recall probe and the logit comparisons that check a pruned or reloaded model."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def next_token_loss(model: nn.Module, tokens: torch.Tensor, batch_size: int = 4, progress: bool = True,
                    desc: str = "") -> float:
    """Mean next-token negative log-likelihood (nats) over every predicted token of ``tokens`` [N, L]."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in tqdm(tokens.split(batch_size), desc=desc or "loss", unit="batch", disable=not progress):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return total / count


def perplexity(model: nn.Module, tokens: torch.Tensor, batch_size: int = 4, progress: bool = True, desc: str = "") -> float:
    """exp(mean next-token negative log-likelihood) over every predicted token of ``tokens`` [N, L]."""
    return math.exp(next_token_loss(model, tokens, batch_size, progress, desc or "perplexity"))


@torch.no_grad()
def logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Float32 logits [N, L, V] of ``tokens`` [N, L] on the model's device, returned on the CPU."""
    device = next(model.parameters()).device
    return model(input_ids=tokens.to(device), use_cache=False).logits.float().cpu()


def max_logit_difference(first: nn.Module, second: nn.Module, tokens: torch.Tensor) -> float:
    """Largest absolute difference between the two models' logits on ``tokens`` [N, L]."""
    return (logits(first, tokens) - logits(second, tokens)).abs().max().item()



def recall_spans(tokens: torch.Tensor, samples: int = 8, span: int = 64) -> torch.Tensor:
    """The recall probe's spans: the first ``span`` tokens of the first ``samples`` windows of ``tokens`` [N, L]."""
    return tokens[:samples, :span]


@torch.no_grad()
def copy_recall(model: nn.Module, spans: torch.Tensor, batch_size: int = 4) -> float:
    """In-context recall: accuracy of greedy next-token prediction on the second copy of each span.

    Every span [S] of ``spans`` [N, S] is written twice; one teacher-forced forward pass over [N, 2S] scores
    each token of the second copy but its first (which the text does not determine): N · (S − 1) predictions.
    A model that can look back copies them; one that cannot does no better than on unseen text.
    """
    span = spans.shape[1]
    tokens = torch.cat([spans, spans], dim=1)
    device = next(model.parameters()).device
    correct = 0
    for batch in tokens.split(batch_size):
        batch = batch.to(device)
        predicted = model(input_ids=batch, use_cache=False).logits[:, span:-1].argmax(-1)
        correct += (predicted == batch[:, span + 1 :]).sum().item()
    return correct / (spans.shape[0] * (span - 1))
