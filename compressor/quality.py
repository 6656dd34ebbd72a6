"""``compress eval``: perplexity and the copy-recall probe of any supported model or ``prune`` output folder."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .accounting import versions
from .evaluation import eval_windows, quality
from .loading import LoadedModel, load_model
from .preflight import EVAL_WRITER, check_eval_inputs, check_json_replaceable
from .settings import DEVICE_MAPS, EvalSettings, choice
from .tuned_kernels import recorded_fla_configs


@recorded_fla_configs()
def evaluate(
    model: str | LoadedModel,
    settings: EvalSettings | None = None,
    device: str = "auto",
    dtype: str = "auto",
    json_path: str | Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
    device_map: str | None = None,
) -> dict:
    """Held-out perplexity on ``settings.samples`` windows of ``settings.path`` (default: the embedded held-out
    Python-docs text; None samples: every whole window, in order) and copy-recall accuracy on the first 64 tokens of
    the first 8 windows (``evaluation.copy_recall``), as ``prune --eval`` measures them.

    Returns the figures as a dict, also written to ``json_path`` when given (an existing file only with
    ``overwrite``, and only one that ``compress eval`` wrote). Options are checked before the model loads. ``device_map`` (``auto``, ``balanced``,
    ``sequential``) spreads the decoder layers over the visible GPUs instead of ``device``.
    """
    settings = settings or EvalSettings()
    json_path = None if json_path is None else Path(json_path).expanduser()
    check_eval_inputs(settings, json_path, overwrite)

    if device_map is not None:
        choice("--device-map", device_map, DEVICE_MAPS)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device, dtype, purpose="evaluate",
                                                                     device_map=device_map)
    tokens, data = eval_windows(settings, loaded.tokenizer)
    measured = quality(loaded.model, tokens, settings.batch_size, progress)
    figures = {
        "written_by": EVAL_WRITER,
        "model": loaded.source,
        "data": data,
        "windows": tokens.shape[0],
        "seq_len": tokens.shape[1],
        "tokens": int(tokens.numel()),
        "loss": measured.loss,
        "perplexity": measured.perplexity,
        "recall_accuracy": measured.recall_accuracy,
        "recall_probe": measured.recall_probe,
        "device": str(next(loaded.model.parameters()).device),
        "dtype": str(loaded.model.dtype).removeprefix("torch."),
        "versions": versions(),
    }
    if json_path is not None:  # a new temporary file beside it, renamed over it: no other file is touched
        handle, staging = tempfile.mkstemp(prefix=f".{Path(json_path).name}.", dir=Path(json_path).resolve().parent)
        try:
            with os.fdopen(handle, "w") as out:
                out.write(json.dumps(figures, indent=2) + "\n")
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(staging, 0o666 & ~umask)  # mkstemp's file is private; the result gets the usual permissions
            check_json_replaceable(Path(json_path), overwrite)  # nothing else appeared there meanwhile
            os.replace(staging, json_path)
        finally:
            Path(staging).unlink(missing_ok=True)
    return figures
