"""``compress eval``: perplexity and the copy-recall probe of any supported model or ``prune`` output folder."""

from __future__ import annotations

import json
import math
import os
from importlib import resources
from pathlib import Path

from .calibration import read_text, token_windows
from .errors import CompressorError
from .evaluation import copy_recall, next_token_loss, recall_spans
from .loading import LoadedModel, load_model
from .pipeline import versions

EMBEDDED_EVALUATION = "python-docs-eval.txt"


def evaluate(
    model: str | LoadedModel,
    eval_path: str | Path | None = None,
    samples: int | None = None,
    seq_len: int = 1024,
    batch_size: int = 4,
    device: str = "auto",
    dtype: str = "auto",
    json_path: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Held-out perplexity on ``samples`` windows [samples, seq_len] of ``eval_path`` (default: the embedded
    held-out Python-docs text; None samples: every whole window, in order) and copy-recall accuracy on the first
    64 tokens of the first 8 windows (``evaluation.copy_recall``), as ``prune --eval`` measures them.

    Returns the figures as a dict, also written to ``json_path`` when given. Options are checked before the
    model loads.
    """
    if eval_path is not None and not Path(eval_path).is_file():
        raise CompressorError(f"evaluation file {eval_path} does not exist.")
    if samples is not None and samples < 1:
        raise CompressorError(f"--samples must be at least 1, got {samples}.")
    if seq_len < 2:
        raise CompressorError(f"--seq-len must be at least 2, got {seq_len}.")
    if batch_size < 1:
        raise CompressorError(f"--batch-size must be at least 1, got {batch_size}.")
    if json_path is not None and not Path(json_path).resolve().parent.is_dir():
        raise CompressorError(f"the folder of --json {json_path} does not exist.")

    loaded = model if isinstance(model, LoadedModel) else load_model(model, device, dtype)
    if eval_path is None:
        text = resources.files("compressor.data").joinpath(EMBEDDED_EVALUATION).read_text(encoding="utf-8")
        data = f"embedded:{EMBEDDED_EVALUATION} (Python 3.11 documentation, PSF License)"
    else:
        text, data = read_text(str(eval_path))
    tokens = token_windows(loaded.tokenizer, text, samples, seq_len, 0)
    loss = next_token_loss(loaded.model, tokens, batch_size, progress, "perplexity")
    spans = recall_spans(tokens)
    figures = {
        "model": loaded.source,
        "data": data,
        "windows": tokens.shape[0],
        "seq_len": tokens.shape[1],
        "tokens": int(tokens.numel()),
        "loss": loss,
        "perplexity": math.exp(loss),
        "recall_accuracy": copy_recall(loaded.model, spans, batch_size),
        "recall_probe": f"{spans.shape[0]} spans of {spans.shape[1]} evaluation tokens, each repeated; greedy "
                        "accuracy on the second copy",
        "device": str(next(loaded.model.parameters()).device),
        "dtype": str(loaded.model.dtype).removeprefix("torch."),
        "versions": versions(),
    }
    if json_path is not None:
        staging = Path(f"{json_path}.partial")
        staging.write_text(json.dumps(figures, indent=2) + "\n")
        os.replace(staging, json_path)
    return figures
