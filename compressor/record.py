"""``compression.json``: what ``prune`` did, as one typed value written once and read back by the card, the Hub
commit message and the command-line summary.

Reading is strict: an unknown or missing field is an error naming it. The record carries its ``format``; older
formats are upgraded on reading (format 1 had no ``source``: its ``base_model`` was the source as given).
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from .errors import CompressorError

FORMAT = 2
FILE = "compression.json"


@dataclass
class LayerRecord:
    """One linear-attention layer; head indices are the source model's."""

    heads_before: int
    kept_heads: list[int]
    score: list[float]
    rank: list[float]
    norm: list[float]
    key_heads_before: int | None = None
    kept_key_heads: list[int] | None = None
    value_to_key: list[int] | None = None
    """The explicit value -> key head map the layer was written with, when the stock grouping cannot describe it."""
    kept_key_channels: dict[str, list[int]] | None = None
    """``--key-reduction``: kept key head (source numbering) -> its kept query/key channels."""


@dataclass
class MethodRecord:
    name: str
    alpha: float
    remove: str
    budget: str
    state_reduction: float | None
    heads_per_layer: dict[str, int] | None
    protect_layers: list[int]
    min_heads_per_layer: int
    seed: int
    loss_tokens: int | None = None
    """``loss`` and ``auto``: tokens the loss scorer masked each head on."""
    chosen: str | None = None
    """``auto``: the rule it chose (``remove`` is then the end it chose)."""
    chosen_seed: int | None = None
    auto_holdout: float | None = None
    held_out_tokens: int | None = None
    candidates: list[dict] | None = None
    """``auto``: every rule's name, remove, seed, held-out loss and perplexity, in the order tried."""
    key_reduction: float | None = None
    """``--key-reduction``: the share of query/key channels asked to be removed from every key head."""
    key_method: str | None = None
    key_chosen: str | None = None
    """``--key-method auto``: the channel method it chose."""
    key_candidates: list[dict] | None = None
    """``--key-method auto``: every channel method's held-out loss and perplexity, in the order tried."""
    key_dim_before: int | None = None
    key_dim_after: int | None = None
    axes_candidates: list[dict] | None = None
    """``--key-reduction auto``: every split of the state budget tried (heads, channels, channels and heads), with
    its key reduction, the head rule and channel method behind it, held-out loss and perplexity."""
    axes_chosen: str | None = None
    """``--key-reduction auto``: the split written (the lowest held-out loss)."""


@dataclass
class CalibrationRecord:
    source: str | None
    samples: int | None
    seq_len: int | None
    tokens: int | None
    eps: float | None


@dataclass
class EvalRecord:
    perplexity_before: float
    recall_accuracy_before: float
    perplexity_after: float
    recall_accuracy_after: float
    recall_probe: str
    data: str
    tokens: int


@dataclass
class VerifyRecord:
    max_abs_logit_diff: float
    passed: bool
    tokens: int


@dataclass
class CompressionRecord:
    source: str
    """The model as it was given: a folder or a Hub id."""
    base_model: str
    """The Hub id the card links (``--base-model``, the source's id, or its Hub cache path's), else the source."""
    family: str
    license: str | None
    method: MethodRecord
    calibration: CalibrationRecord
    layers: dict[str, LayerRecord]
    dtype: dict[str, str]
    state_bytes_before: int
    state_bytes_after: int
    params_before: int
    params_after: int
    per_layer_heads: bool
    """Whether the config needs ``per_layer_config`` (and so the shipped code) to load."""
    versions: dict[str, str | None]
    layout: str = "free"
    """``free`` (heads may differ by layer) or ``stock`` (the same heads in every layer: a stock config)."""
    eval: EvalRecord | None = None
    verify: VerifyRecord | None = None
    recovery: dict | None = None
    """What ``compress heal`` trained, on what, and the figures before and after."""
    format: int = FORMAT

    def to_dict(self) -> dict:
        """The JSON object, without the optional fields that are not set."""
        return _without_none(asdict(self), self)

    def write(self, folder: Path) -> None:
        (folder / FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, folder: Path) -> CompressionRecord:
        path = Path(folder) / FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CompressorError(f"{folder} has no {FILE}, so compressor did not write it.") from None
        except (OSError, ValueError) as error:
            raise CompressorError(f"{path} cannot be read: {error}.") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict, where: str = FILE) -> CompressionRecord:
        data = _upgraded(dict(_object(data, where)), where)
        nested = {
            "method": lambda v: _build(MethodRecord, v, f"{where}: method"),
            "calibration": lambda v: _build(CalibrationRecord, v, f"{where}: calibration"),
            "layers": lambda v: {k: _build(LayerRecord, x, f"{where}: layer {k}") for k, x in _object(v, where).items()},
            "eval": lambda v: None if v is None else _build(EvalRecord, v, f"{where}: eval"),
            "verify": lambda v: None if v is None else _build(VerifyRecord, v, f"{where}: verify"),
        }
        converted = {key: nested[key](value) if key in nested else value for key, value in data.items()}
        return _build(cls, converted, where)


def _upgraded(data: dict, where: str) -> dict:
    version = data.get("format")
    if version == 1:
        data["source"] = data["base_model"]
        data["format"] = FORMAT
    elif version != FORMAT:
        raise CompressorError(f"{where} is of format {version}; this compressor reads formats 1 to {FORMAT}.")
    return data


def _object(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise CompressorError(f"{where} is not a JSON object.")
    return value


def _build(cls, data: dict, where: str):
    """``cls(**data)``, refusing unknown and missing fields by name."""
    data = _object(data, where)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise CompressorError(f"{where} has unknown field(s) {', '.join(unknown)}.")
    required = {f.name for f in fields(cls) if f.default is f.default_factory is MISSING}
    missing = sorted(required - set(data))
    if missing:
        raise CompressorError(f"{where} lacks the field(s) {', '.join(missing)}.")
    return cls(**data)


def _without_none(data: dict, value) -> dict:
    """Drop optional fields (those with a default) that are None, at every level of dataclasses."""
    optional = {f.name for f in fields(value) if f.default is not MISSING or f.default_factory is not MISSING}
    cleaned = {}
    for f in fields(value):
        item, raw = data[f.name], getattr(value, f.name)
        if item is None and f.name in optional:
            continue
        if isinstance(raw, dict) and raw and all(hasattr(x, "__dataclass_fields__") for x in raw.values()):
            item = {k: _without_none(item[k], raw[k]) for k in raw}
        elif hasattr(raw, "__dataclass_fields__"):
            item = _without_none(item, raw)
        cleaned[f.name] = item
    return cleaned
