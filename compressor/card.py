"""Render the model card (README.md of an output folder) from its compression.json record.

The layout lives in ``model_cards/model_card.md.j2`` (shipped as ``compressor.model_cards``); this module
turns the record into display-ready values and makes sure no Hub token ends up in the card.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path, PurePath

import jinja2
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .record import CompressionRecord

_DATASET_SOURCE = re.compile(r"^hf:([^\s:]+)")
"""How calibration records a Hub dataset: ``hf:ID[:CONFIG] (split …, column …)``."""
TEMPLATE = "model_card.md.j2"
_LABELS = {"recall_accuracy": "copy-recall accuracy"}
_TOKEN_PATTERNS = (
    re.compile(r"(--token[= ]+)\S+"),  # a token given on the command line
    re.compile(r"\bhf_[A-Za-z0-9]{8,}"),  # any Hugging Face access token
)


def render_card(
    compression: CompressionRecord,
    *,
    command: str | None = None,
    figures: Sequence[str] = (),
    repo_id: str | None = None,
    text_model_of: str | None = None,
) -> str:
    """Return the model card (Markdown with YAML front matter) for a ``compression.json`` record.

    ``command`` is shown under "Reproduce"; ``figures`` are image paths relative to the card's folder;
    ``repo_id`` is the id used in the loading snippet (a placeholder folder path when not given);
    ``text_model_of`` names the base model's vision-language class when only its text model was pruned.
    """
    record = compression.to_dict()
    if any(PurePath(path).is_absolute() for path in figures):
        raise ValueError(f"figure paths must be relative to the card's folder: {list(map(str, figures))}")
    layers = [_layer_row(index, layer) for index, layer in sorted(record["layers"].items(), key=lambda kv: int(kv[0]))]
    uneven = [row for row in layers if row["value_to_key"] is not None]
    context = {
        "record": record,
        "base_name": PurePath(record["base_model"].rstrip("/")).name,
        "base_model_id": _hub_id(record["base_model"]),
        "dataset_id": _dataset_id(record["calibration"]["source"]),
        "layers": layers,
        "uneven_layers": uneven,
        "heads_total": sum(row["before"] for row in layers),
        "heads_removed": sum(row["before"] - row["after"] for row in layers),
        "ships_code": bool(record["per_layer_heads"] or uneven),
        "decode_graphs": replays_decode_graphs(record["family"]),
        "eval": record.get("eval"),
        "eval_rows": _eval_rows(record.get("eval") or {}),
        "verify": record.get("verify"),
        "figures": [(PurePath(path).stem, PurePath(path).as_posix()) for path in figures],
        "command": command,
        "load_id": repo_id or "path/to/this/folder",
        "text_model_of": text_model_of,
    }
    return _redact(_template().render(context))


def replays_decode_graphs(model_type: str) -> bool:
    """Whether the shipped code of ``model_type`` replays its decode steps from CUDA graphs: its mixer runs the
    forward of ``compressor/modeling/decode_graph.py``."""
    from .families import FAMILIES
    from .modeling.decode_graph import RecordedDecodeSteps

    family = next((family for family in FAMILIES if model_type in family.model_types), None)
    return family is not None and family.mixer_class.forward is RecordedDecodeSteps.forward


@functools.lru_cache(maxsize=1)
def _template() -> jinja2.Template:
    """The card template, read from the installed ``compressor.model_cards`` package."""
    source = _template_path().read_text("utf-8")
    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True
    )
    env.filters.update(
        bytes=human_bytes,
        params=human_params,
        pct=reduction_pct,
        num="{:,}".format,
        cell=_cell,
        setting=_setting,
        yaml=json.dumps,
    )
    return env.from_string(source)


def _template_path():
    """The card template: the installed ``compressor.model_cards`` package, or ``model_cards/`` beside the package
    in a source checkout that was not installed."""
    try:
        return importlib.resources.files("compressor.model_cards").joinpath(TEMPLATE)
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "model_cards" / TEMPLATE


def human_bytes(n: int) -> str:
    """``1536`` → ``'1.50 KiB'`` (binary units; plain bytes below 1 KiB)."""
    if abs(n) < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if abs(value) < 1024:
            break
    return f"{value:.2f} {unit}"


def human_params(n: int) -> str:
    """``6_060_000`` → ``'6.06M'``; ``1_350_000_000`` → ``'1.35B'``."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def reduction_pct(pair: Sequence[float]) -> str:
    """``(before, after)`` → the reduction as ``'37.5 %'``."""
    before, after = pair
    return f"{100 * (before - after) / before:.1f} %" if before else "0.0 %"


def _layer_row(index: str, layer: dict) -> dict:
    """One row of the per-layer table."""
    kept_keys = layer.get("kept_key_heads")
    return {
        "index": int(index),
        "before": layer["heads_before"],
        "after": len(layer["kept_heads"]),
        "kept": ", ".join(map(str, layer["kept_heads"])),
        "keys_before": layer.get("key_heads_before"),
        "keys_after": None if kept_keys is None else len(kept_keys),
        "value_to_key": layer.get("value_to_key"),
    }


def _hub_id(value: str) -> str | None:
    """``value`` when it looks like a Hub model id ``owner/name`` (and is no local folder), else None."""
    if value.count("/") != 1 or Path(value).expanduser().exists():
        return None
    try:
        validate_repo_id(value)
    except HFValidationError:
        return None
    return value


def _dataset_id(source: str | None) -> str | None:
    """The Hub dataset id of a calibration source recorded as ``hf:ID[:CONFIG] (split …)``, else None."""
    found = _DATASET_SOURCE.match(source or "")
    if found is None:
        return None
    try:
        validate_repo_id(found.group(1))
    except HFValidationError:
        return None
    return found.group(1)


def _eval_rows(results: dict) -> tuple[list[tuple[str, str, str]], list[tuple[str, str]]]:
    """``(metric, before, after)`` rows from ``*_before``/``*_after`` pairs, and ``(name, value)`` for the rest.

    ``data`` and ``tokens`` (what was measured on) are left to the template.
    """
    pairs, others, seen = [], [], {"data", "tokens"}
    for key in results:
        metric = re.sub(r"_(before|after)$", "", key)
        if metric in seen:
            continue
        seen.add(metric)
        label = _LABELS.get(metric, metric.replace("_", " "))
        if metric == key:
            others.append((label, _metric(key, results[key])))
        else:
            before, after = results.get(f"{metric}_before"), results.get(f"{metric}_after")
            pairs.append((label, _metric(metric, before), _metric(metric, after)))
    return pairs, others


def _metric(name: str, value) -> str:
    """Perplexity with 2 decimals, accuracies in 0..1 as percentages, other numbers with 4 digits."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _cell(str(value))
    if "perplexity" in name:
        return f"{value:.2f}"
    if "accuracy" in name and 0 <= value <= 1:
        return f"{100 * value:.1f} %"
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _setting(value) -> str:
    """A method setting for a table cell: strings as they are, None as a dash, the rest as JSON."""
    if value is None:
        return "—"
    return _cell(value if isinstance(value, str) else json.dumps(value))


def _cell(text, limit: int = 200) -> str:
    """``text`` made safe for one Markdown table cell (no pipes or newlines, at most ``limit`` characters)."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _redact(text: str) -> str:
    """Remove anything that looks like a Hub token, and the value of ``HF_TOKEN`` if set."""
    for pattern in _TOKEN_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "hf_") + "***", text)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        secret = os.environ.get(name, "")
        if len(secret) >= 8:
            text = text.replace(secret, "***")
    return text
