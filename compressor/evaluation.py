"""Next-token loss, perplexity, an in-context recall probe and the logit comparisons that check a pruned or
reloaded model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .record import EvalRecord
from .settings import EvalSettings


@torch.no_grad()
def token_losses(model: nn.Module, ids: torch.Tensor, positions_per_chunk: int = 512) -> torch.Tensor:
    """Next-token negative log-likelihood [B, T - 1] (float32) of ``ids`` [B, T], on ``ids``' device.

    The decoder's hidden states [B, T, D] go through the output head ``positions_per_chunk`` positions at a time,
    so full-vocabulary logits never exist for more positions than that (with Qwen3.5's 248k vocabulary, the
    float32 logits of 16 × 256 positions alone take 4 GB). Equal to the cross-entropy of ``model(ids).logits``
    (tested for every family).
    """
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
    return losses_of_hidden(model.get_output_embeddings(), hidden, ids, positions_per_chunk)


def losses_of_hidden(head: nn.Module, hidden: torch.Tensor, ids: torch.Tensor, positions_per_chunk: int = 512
                     ) -> torch.Tensor:
    """:func:`token_losses` from the decoder's final hidden states [B, T, D] of ``ids`` [B, T] and the output head."""
    hidden = hidden[:, :-1]
    targets = ids[:, 1:].flatten()
    losses = []
    for states, target in zip(hidden.flatten(0, 1).split(positions_per_chunk), targets.split(positions_per_chunk)):
        logits = head(states).float()  # on the head's device, under a device map
        losses.append(F.cross_entropy(logits, target.to(logits.device), reduction="none").to(ids.device))
    return torch.cat(losses).view(ids.shape[0], -1)


@torch.no_grad()
def next_token_loss(model: nn.Module, tokens: torch.Tensor, batch_size: int = 4, progress: bool = True,
                    desc: str = "") -> float:
    """Mean next-token negative log-likelihood (nats) over every predicted token of ``tokens`` [N, L]."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in tqdm(tokens.split(batch_size), desc=desc or "loss", unit="batch", disable=not progress):
        batch = batch.to(device)
        total += token_losses(model, batch).double().sum().item()
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


EMBEDDED_EVALUATION = "python-docs-eval.txt"


def eval_windows(settings: EvalSettings, tokenizer, prefix: str = "--") -> tuple[torch.Tensor, str]:
    """(evaluation windows [N, seq_len] of ``settings.path``, every whole one in order unless ``settings.samples``;
    a description of the text). ``path`` None is the embedded held-out Python-docs text."""
    from .calibration_text import read_text_file, token_windows

    if settings.path is None:
        text = resources.files("compressor.data").joinpath(EMBEDDED_EVALUATION).read_text(encoding="utf-8")
        data = f"embedded:{EMBEDDED_EVALUATION} (Python 3.11 documentation, PSF License)"
    else:
        text, data = read_text_file(Path(settings.path)), str(settings.path)
    return token_windows(tokenizer, text, settings.samples, settings.seq_len, 0, f"{prefix}samples"), data


@dataclass
class Quality:
    """Held-out perplexity and copy-recall accuracy of one model on one text."""

    loss: float
    perplexity: float
    recall_accuracy: float
    recall_probe: str


def quality(model: nn.Module, tokens: torch.Tensor, batch_size: int = 4, progress: bool = True,
            desc: str = "perplexity") -> Quality:
    """Perplexity on ``tokens`` [N, L] and copy recall on the first 64 tokens of its first 8 windows."""
    loss = next_token_loss(model, tokens, batch_size, progress, desc)
    spans = recall_spans(tokens)
    return Quality(loss, math.exp(loss), copy_recall(model, spans, batch_size), recall_probe(spans))


def recall_probe(spans: torch.Tensor) -> str:
    """What the copy-recall figure measured, in words, for ``spans`` [N, S] (``recall_spans``)."""
    count, length = spans.shape
    return (f"{count} span{'s' * (count != 1)} of {length} evaluation tokens, each repeated; greedy accuracy on the "
            "second copy")


def eval_record(before: Quality, after: Quality, data: str, tokens: torch.Tensor) -> EvalRecord:
    """``compression.json``'s ``eval``: ``before`` and ``after`` pruning, on ``tokens`` of ``data``."""
    return EvalRecord(perplexity_before=before.perplexity, recall_accuracy_before=before.recall_accuracy,
                      perplexity_after=after.perplexity, recall_accuracy_after=after.recall_accuracy,
                      recall_probe=after.recall_probe, data=data, tokens=int(tokens.numel()))
