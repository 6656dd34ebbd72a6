"""Evaluation and the reload check of a model that runs one decoder layer at a time (``compressor.sequential``): the
same figures as ``compressor.evaluation`` and ``compressor.export.verify_folder`` compute on a whole model, from the
final hidden states of every window, pushed through one layer after another."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import CompressorError
from .evaluation import Quality, losses_of_hidden, recall_probe, recall_spans
from .layers import PruningPlan, linear_layers
from .record import VerifyRecord
from .sequential import LayerByLayer
from .slicing import replace_mixer, slimmed_config


@torch.no_grad()
def layer_by_layer_quality(runner: LayerByLayer, tokens: torch.Tensor, batch_size: int = 4,
                           edit: Callable[[int], None] | None = None) -> Quality:
    """Perplexity on ``tokens`` [N, L] and copy recall on the first 64 tokens of its first 8 windows (each span
    written twice), as ``evaluation.quality`` measures them, with one pass through the layers for both."""
    spans = recall_spans(tokens)
    span = spans.shape[1]
    windows = list(tokens.split(batch_size))
    copies = list(torch.cat([spans, spans], dim=1).split(batch_size))
    hidden = runner.final_hidden(windows + copies, edit)
    total, count, correct = 0.0, 0, 0
    with runner.head() as head:
        for ids, states in zip(windows, hidden):
            ids = ids.to(runner.device)
            total += losses_of_hidden(head, states, ids).double().sum().item()
            count += ids[:, 1:].numel()
        for ids, states in zip(copies, hidden[len(windows):]):
            ids = ids.to(runner.device)
            correct += (head(states).argmax(-1)[:, span:-1] == ids[:, span + 1:]).sum().item()
    accuracy = correct / (spans.shape[0] * (span - 1))
    return Quality(total / count, math.exp(total / count), accuracy, recall_probe(spans))


def pruning_edit(runner: LayerByLayer, plan: PruningPlan) -> Callable[[int], None]:
    """An ``edit`` for ``runner`` (over the unpruned source) that slices each loaded linear-attention layer as
    ``plan`` says, as ``slim`` slices the whole model."""
    family = runner.family
    config = slimmed_config(runner.model, family, plan)
    linear = set(linear_layers(runner.model, family))

    def edit(index: int) -> None:
        if index in linear:
            replace_mixer(runner.model, family, index, plan, config)

    return edit


@torch.no_grad()
def logits_layer_by_layer(runner: LayerByLayer, tokens: torch.Tensor, edit: Callable[[int], None] | None = None
                          ) -> torch.Tensor:
    """Float32 logits [N, L, V] of ``tokens`` [N, L], on the CPU."""
    hidden = runner.final_hidden([tokens], edit)
    with runner.head() as head:
        return head(hidden[0]).float().cpu()


def verify_layer_by_layer(source: LayerByLayer, written: LayerByLayer, plan: PruningPlan, tokens: torch.Tensor,
                          tolerance: float) -> VerifyRecord:
    """Logits of the written folder (its weights read layer by layer into its own pruned model) against the source's
    with ``plan`` applied to each layer as it loads; raise on a mismatch."""
    difference = (logits_layer_by_layer(written, tokens)
                  - logits_layer_by_layer(source, tokens, pruning_edit(source, plan))).abs().max().item()
    if not difference <= tolerance:
        raise CompressorError(f"verification failed: the written folder's logits differ by {difference:.3g}.")
    return VerifyRecord(max_abs_logit_diff=difference, passed=True, tokens=int(tokens.numel()))


def runner_for(folder: Path, device: str, dtype: str, memory: int) -> LayerByLayer:
    """A ``LayerByLayer`` over the model of ``folder`` (a source or a written output)."""
    from .loading import load_layer_by_layer

    return load_layer_by_layer(str(folder), device, dtype, memory).layer_by_layer
