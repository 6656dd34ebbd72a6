"""Budgets: how many heads each linear-attention layer may lose, and which layers are left alone.

Three kinds, all honouring ``protect_layers`` (never pruned) and ``min_heads_per_layer``:

- ``global`` (default): remove heads in score order across the whole model until the recurrent-state bytes fall
  by at least ``state_reduction``;
- ``uniform``: every unprotected layer loses the same share of its heads — the smallest share that brings the
  model's state down by ``state_reduction`` — and the scores choose which heads within each layer;
- ``per_layer``: an explicit number of heads to keep in each listed layer (unlisted layers keep every head);
- ``stock`` (``--layout stock``): every layer keeps the same k key heads and the same q value heads under each of
  them, the largest k·q that still removes ``state_reduction``: a plan that stock code and inference engines, which
  read one head count for every layer, can run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .errors import CompressorError
from .layers import PruningPlan
from .settings import BUDGETS, DEFAULT_STATE_REDUCTION, REMOVE



@dataclass(frozen=True)
class Budget:
    kind: str = "global"
    state_reduction: float | None = DEFAULT_STATE_REDUCTION
    heads_per_layer: dict[int, int] = field(default_factory=dict)
    """``per_layer`` only: layer -> value heads kept."""
    protect_layers: tuple[int, ...] = ()
    min_heads_per_layer: int = 1
    groups: dict[int, tuple[int, ...]] = field(default_factory=dict)
    """``stock`` only, once fitted to a model: layer -> the key head each value head reads."""

    def fitted(self, value_to_key: dict[int, tuple[int, ...]]) -> Budget:
        """This budget for a model whose layers' value heads read the key heads ``value_to_key`` (layer -> map)."""
        return replace(self, groups=dict(value_to_key)) if self.kind == "stock" else self

    def record(self) -> dict:
        """The budget's entries of ``compression.json``'s ``method``."""
        return {
            "budget": self.kind,
            "state_reduction": self.state_reduction,
            "heads_per_layer": {str(layer): n for layer, n in sorted(self.heads_per_layer.items())} or None,
            "protect_layers": list(self.protect_layers),
            "min_heads_per_layer": self.min_heads_per_layer,
        }

    def check_model(self, head_counts: dict[int, int], head_bytes: dict[int, int]) -> None:
        """Refuse a budget this model cannot meet (``head_counts``/``head_bytes``: layer -> value heads / bytes of
        one head's state), before any calibration."""
        layers = ", ".join(map(str, sorted(head_counts)))
        for option, named in (("--protect-layers", self.protect_layers), ("--heads-per-layer", self.heads_per_layer)):
            for layer in sorted(named):
                if layer not in head_counts:
                    raise CompressorError(f"{option} names layer {layer}, which is not a linear-attention layer; "
                                          f"those are {layers}.")
        if self.kind == "global":
            check_budget(head_counts, head_bytes, self.state_reduction, self.min_heads_per_layer, self.protect_layers)
        elif self.kind == "stock":
            stock_shape(self.groups, self.state_reduction, self.min_heads_per_layer)
        else:
            self.removals(head_counts, head_bytes)

    def removals(self, head_counts: dict[int, int], head_bytes: dict[int, int]) -> dict[int, int]:
        """Layer -> heads to remove, for ``uniform`` and ``per_layer`` budgets."""
        if self.kind == "per_layer":
            for layer, kept in sorted(self.heads_per_layer.items()):
                if kept > head_counts[layer]:
                    raise CompressorError(f"--heads-per-layer keeps {kept} heads in layer {layer}, which has only "
                                          f"{head_counts[layer]}.")
            counts = {layer: head_counts[layer] - self.heads_per_layer.get(layer, head_counts[layer])
                      for layer in head_counts}
            if not any(counts.values()):
                raise CompressorError("--heads-per-layer keeps every head of every layer; there is nothing to remove.")
            return counts
        return uniform_removals(head_counts, head_bytes, self.state_reduction, self.min_heads_per_layer,
                                self.protect_layers)

    def plan(self, scores: dict[int, torch.Tensor], head_bytes: dict[int, int], remove: str = "high") -> PruningPlan:
        """Remove heads in ``scores`` order (layer -> [H]; highest first for ``remove='high'``) within this budget.
        Ties break by (layer, head)."""
        if self.kind == "global":
            return plan_by_budget(scores, head_bytes, self.state_reduction, remove, self.min_heads_per_layer,
                                  self.protect_layers)
        if remove not in REMOVE:
            raise CompressorError(f"--remove must be 'high' or 'low', got '{remove}'.")
        if self.kind == "stock":
            return stock_plan(scores, self.groups, stock_shape(self.groups, self.state_reduction,
                                                               self.min_heads_per_layer), remove)
        counts = self.removals({layer: len(s) for layer, s in scores.items()}, head_bytes)
        sign = -1.0 if remove == "high" else 1.0
        kept, removed = {}, []
        for layer, s in scores.items():
            order = sorted(range(len(s)), key=lambda head: (sign * float(s[head]), head))
            removed += [(layer, head) for head in order[: counts[layer]]]
            kept[layer] = sorted(order[counts[layer] :])
        return PruningPlan(kept=kept, removed_by_rule=removed)


def uniform_removals(head_counts: dict[int, int], head_bytes: dict[int, int], state_reduction: float,
                     min_heads_per_layer: int, protect_layers: tuple[int, ...] = ()) -> dict[int, int]:
    """Layer -> ceil(s · heads) for every unprotected layer (0 for protected ones), with s the smallest share of
    heads whose removal frees at least ``state_reduction`` of the state bytes."""
    free = [layer for layer in head_counts if layer not in protect_layers]
    total = sum(head_bytes[layer] * count for layer, count in head_counts.items())
    target = math.ceil(state_reduction * total - 1e-9)
    for share in sorted({k / head_counts[layer] for layer in free for k in range(1, head_counts[layer] + 1)}):
        counts = {layer: math.ceil(share * head_counts[layer] - 1e-9) for layer in free}
        if sum(head_bytes[layer] * n for layer, n in counts.items()) < target:
            continue
        for layer, n in counts.items():
            if head_counts[layer] - n < min_heads_per_layer:
                raise CompressorError(
                    f"a uniform state reduction of {state_reduction:.1%} removes {n} of the {head_counts[layer]} "
                    f"heads of layer {layer}, leaving fewer than --min-heads-per-layer {min_heads_per_layer}: "
                    f"{remedies(min_heads_per_layer, ())}, or use --budget global."
                )
        return {layer: counts.get(layer, 0) for layer in head_counts}
    raise CompressorError(f"a state reduction of {state_reduction:.1%} cannot be met without the protected layers "
                          f"{', '.join(map(str, protect_layers))}: {remedies(1, protect_layers)}.")


def remedies(min_heads_per_layer: int, protect_layers: tuple[int, ...]) -> str:
    """What a refused budget can lower, in words: the share, the protected layers where some are, the minimum per
    layer where it is above one."""
    options = ["lower --state-reduction"] + ["protect fewer layers"] * bool(protect_layers)
    options += ["lower --min-heads-per-layer"] * (min_heads_per_layer > 1)
    return ", ".join(options[:-1]) + " or " + options[-1] if len(options) > 1 else options[0]


def check_budget_options(state_reduction: float, min_heads_per_layer: int) -> None:
    if not 0.0 < state_reduction < 1.0:
        raise CompressorError(f"--state-reduction must lie strictly between 0 and 1, got {state_reduction}.")
    if min_heads_per_layer < 1:
        raise CompressorError(f"--min-heads-per-layer must be at least 1, got {min_heads_per_layer}.")


def check_budget(head_counts: dict[int, int], head_bytes: dict[int, int], state_reduction: float,
                 min_heads_per_layer: int = 1, protect_layers: tuple[int, ...] = ()) -> None:
    """Refuse a budget that no choice of heads can meet (checked before any calibration)."""
    check_budget_options(state_reduction, min_heads_per_layer)
    total = sum(head_bytes[layer] * count for layer, count in head_counts.items())
    freeable = sum(head_bytes[layer] * max(count - min_heads_per_layer, 0) for layer, count in head_counts.items()
                   if layer not in protect_layers)
    if freeable < math.ceil(state_reduction * total - 1e-9):
        protected = f" and leaving layers {', '.join(map(str, protect_layers))} whole" if protect_layers else ""
        raise CompressorError(
            f"a state reduction of {state_reduction:.1%} cannot be met while keeping {min_heads_per_layer} "
            f"head{'s' * (min_heads_per_layer != 1)} per layer{protected}; at most {freeable / total:.1%} is possible: "
            f"{remedies(min_heads_per_layer, protect_layers)}."
        )


def plan_by_budget(
    scores: dict[int, torch.Tensor],
    head_bytes: dict[int, int],
    state_reduction: float,
    remove: str = "high",
    min_heads_per_layer: int = 1,
    protect_layers: tuple[int, ...] = (),
) -> PruningPlan:
    """Remove heads in score order (highest first for ``remove='high'``) until the recurrent-state bytes fall by
    at least ``state_reduction``, never leaving a layer with fewer than ``min_heads_per_layer`` heads and never
    touching ``protect_layers``.

    ``head_bytes[layer]`` is the size of one head's state in that layer. Ties break by (layer, head).
    """
    if remove not in REMOVE:
        raise CompressorError(f"--remove must be 'high' or 'low', got '{remove}'.")
    check_budget({layer: len(s) for layer, s in scores.items()}, head_bytes, state_reduction, min_heads_per_layer,
                 protect_layers)
    total = sum(head_bytes[layer] * len(s) for layer, s in scores.items())
    target = math.ceil(state_reduction * total - 1e-9)
    sign = -1.0 if remove == "high" else 1.0
    order = sorted(
        ((layer, head) for layer, s in scores.items() if layer not in protect_layers for head in range(len(s))),
        key=lambda lh: (sign * float(scores[lh[0]][lh[1]]), lh[0], lh[1]),
    )
    kept = {layer: set(range(len(s))) for layer, s in scores.items()}
    removed, freed = [], 0
    for layer, head in order:
        if freed >= target:
            break
        if len(kept[layer]) <= min_heads_per_layer:
            continue
        kept[layer].discard(head)
        removed.append((layer, head))
        freed += head_bytes[layer]
    return PruningPlan(kept={layer: sorted(heads) for layer, heads in kept.items()}, removed_by_rule=removed)


def stock_shape(groups: dict[int, tuple[int, ...]], state_reduction: float, min_heads: int = 1) -> tuple[int, int]:
    """(k, q): key heads kept in every layer and value heads kept under each, the largest k·q (then the largest k)
    that removes at least ``state_reduction`` of the state; a model or budget the stock layout cannot serve is
    refused in one sentence."""
    maps = set(groups.values())
    if len(maps) != 1:
        raise CompressorError("--layout stock needs every linear-attention layer to hold the same heads, and this "
                              "model's layers differ.")
    value_to_key = next(iter(maps))
    keys = max(value_to_key) + 1
    per_key = len(value_to_key) // keys
    if list(value_to_key) != [j // per_key for j in range(len(value_to_key))]:
        raise CompressorError("--layout stock needs the stock grouping of value heads under key heads (value head j "
                              "reads key head j // r), and this model's layers have another.")
    shapes = [(k, q) for k in range(1, keys + 1) for q in range(1, per_key + 1)
              if k * q >= min_heads and k * q <= (1 - state_reduction) * keys * per_key + 1e-9]
    if not shapes:
        possible = 1 - max(min_heads, 1) / (keys * per_key)
        raise CompressorError(
            f"--layout stock keeps k of {keys} key heads and q of {per_key} value heads under each, the same in every "
            f"layer, so it removes at most {possible:.1%} of the state (with --min-heads-per-layer {min_heads}), less "
            f"than --state-reduction {state_reduction}."
        )
    return max(shapes, key=lambda shape: (shape[0] * shape[1], shape[0]))


def stock_plan(scores: dict[int, torch.Tensor], groups: dict[int, tuple[int, ...]], shape: tuple[int, int],
               remove: str) -> PruningPlan:
    """In every layer, the ``shape[1]`` best value heads under each key head (the end of ``scores`` that ``remove``
    keeps), then the ``shape[0]`` key heads whose kept value heads score best together. Ties break by index."""
    keys, per_key = shape
    sign = 1.0 if remove == "low" else -1.0  # the kept end: high scores when the low ones are removed
    kept, removed = {}, []
    for layer, s in scores.items():
        value = {head: sign * float(s[head]) for head in range(len(s))}
        members = {}
        for head, key in enumerate(groups[layer]):
            members.setdefault(key, []).append(head)
        best = {key: sorted(heads, key=lambda h: (-value[h], h))[:per_key] for key, heads in members.items()}
        chosen = sorted(best, key=lambda key: (-sum(value[h] for h in best[key]), key))[:keys]
        kept[layer] = sorted(h for key in chosen for h in best[key])
        removed += [(layer, h) for h in sorted(set(range(len(s))) - set(kept[layer]), key=lambda h: (value[h], h))]
    return PruningPlan(kept=kept, removed_by_rule=removed)


def make_budget(
    kind: str = "global",
    state_reduction: float | None = None,
    heads_per_layer: str | dict[int, int] | None = None,
    protect_layers: str | tuple[int, ...] | list[int] = (),
    min_heads_per_layer: int = 1,
    layout: str = "free",
) -> Budget:
    """Check the budget options on their own (before any model loads) and combine them.

    ``state_reduction`` None means 0.389 unless ``heads_per_layer`` is given; ``heads_per_layer`` is a dict, a
    spec such as ``"0:6,1:4"`` or a JSON file holding ``{"0": 6, "1": 4}``; ``protect_layers`` is a sequence or
    a spec such as ``"0,3"``. ``layout='stock'`` makes a ``stock`` budget (the same heads in every layer).
    """
    if kind not in BUDGETS:
        raise CompressorError(f"unknown budget '{kind}'; choose one of {', '.join(BUDGETS)}, or give "
                              "--heads-per-layer.")
    if min_heads_per_layer < 1:
        raise CompressorError(f"--min-heads-per-layer must be at least 1, got {min_heads_per_layer}.")
    protect = tuple(sorted(set(parse_layers(protect_layers) if isinstance(protect_layers, str) else protect_layers)))
    if layout == "stock":
        if kind != "global":
            raise CompressorError(f"--layout stock removes the same heads in every layer already; drop --budget {kind}.")
        for option, given in (("--heads-per-layer", heads_per_layer is not None), ("--protect-layers", protect)):
            if given:
                raise CompressorError(f"--layout stock keeps the same heads in every layer, which {option} would "
                                      f"break; drop one of them.")
    if heads_per_layer is None:
        reduction = DEFAULT_STATE_REDUCTION if state_reduction is None else state_reduction
        if not 0.0 < reduction < 1.0:
            raise CompressorError(f"--state-reduction must lie strictly between 0 and 1, got {reduction}.")
        return Budget("stock" if layout == "stock" else kind, reduction, {}, protect, min_heads_per_layer)
    if kind != "global":
        raise CompressorError(f"--heads-per-layer sets every layer's head count itself; drop --budget {kind}.")
    if state_reduction is not None:
        raise CompressorError("--heads-per-layer sets every layer's head count itself; drop --state-reduction.")
    counts = parse_heads_per_layer(heads_per_layer) if isinstance(heads_per_layer, str) else dict(heads_per_layer)
    for layer, kept in sorted(counts.items()):
        if layer in protect:
            raise CompressorError(f"layer {layer} is both protected (--protect-layers) and given a head count "
                                  "(--heads-per-layer); name it in one of them.")
        if kept < min_heads_per_layer:
            raise CompressorError(f"--heads-per-layer keeps {kept} head(s) in layer {layer}, fewer than "
                                  f"--min-heads-per-layer {min_heads_per_layer}.")
    return Budget("per_layer", None, counts, protect, min_heads_per_layer)


def parse_layers(spec: str) -> tuple[int, ...]:
    """``"0,3"`` -> (0, 3)."""
    try:
        layers = tuple(int(part) for part in spec.split(",") if part.strip())
    except ValueError:
        raise CompressorError(f"--protect-layers must list layer indices like 0,3, got '{spec}'.") from None
    if any(layer < 0 for layer in layers):
        raise CompressorError(f"--protect-layers must list layer indices like 0,3, got '{spec}'.")
    return layers


def parse_heads_per_layer(spec: str) -> dict[int, int]:
    """``"0:6,1:4"``, or the path of a JSON file holding ``{"0": 6, "1": 4}`` -> {0: 6, 1: 4} (layer -> heads kept)."""
    path = Path(spec)
    if path.suffix.lower() == ".json":
        if not path.is_file():
            raise CompressorError(f"--heads-per-layer file {spec} does not exist.")
        try:
            content = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise CompressorError(f"--heads-per-layer file {spec} is not valid JSON ({error.msg} at line "
                                  f"{error.lineno}, column {error.colno}).") from None
        if not isinstance(content, dict):
            raise CompressorError(f"--heads-per-layer file {spec} must hold a JSON object like "
                                  '{"0": 6, "1": 4}.')
        pairs = list(content.items())
    else:
        pairs = [part.split(":", 1) if ":" in part else (part, "") for part in spec.split(",") if part.strip()]
    try:
        pairs = [(int(layer), int(kept)) for layer, kept in pairs]
    except (TypeError, ValueError):
        raise CompressorError(f"--heads-per-layer must map layers to kept heads like 0:6,1:4, got '{spec}'.") from None
    counts = dict(pairs)
    for layer in counts:
        if [named for named, _ in pairs].count(layer) > 1:
            raise CompressorError(f"--heads-per-layer lists layer {layer} twice, in '{spec}'.")
    if not counts or any(layer < 0 for layer in counts):
        raise CompressorError(f"--heads-per-layer must map layers to kept heads like 0:6,1:4, got '{spec}'.")
    return counts
