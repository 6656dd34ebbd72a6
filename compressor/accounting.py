"""What a plan costs and saves, and the record of it: state bytes, parameter counts, versions, and the
``CompressionRecord`` that ``prune`` writes."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import torch

from . import __version__
from .calibration import StateStatistics
from .errors import CompressorError
from .loading import LoadedModel
from .record import CalibrationRecord, CompressionRecord, LayerRecord, MethodRecord
from .settings import PruneSettings
from .layers import explicit_value_to_key, head_layout, linear_layers, pruned_layout
from .slicing import planned_sizes

HUB_CACHE_PATH = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")


def head_state_bytes(loaded: LoadedModel) -> dict[int, int]:
    """Layer -> bytes of one value head's recurrent state (d_k × d_v in the checkpoint's dtype)."""
    element = loaded.save_dtype.itemsize
    return {i: m.head_k_dim * m.head_v_dim * element for i, m in linear_layers(loaded.model, loaded.family).items()}


def state_bytes(loaded: LoadedModel) -> int:
    """Bytes of the recurrent states of one sequence (all linear-attention layers, checkpoint dtype)."""
    mixers = linear_layers(loaded.model, loaded.family)
    return sum(mixers[i].num_v_heads * size for i, size in head_state_bytes(loaded).items())


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def versions() -> dict[str, str | None]:
    found = {"compressor": __version__}
    for package, name in (("torch", "torch"), ("transformers", "transformers"), ("flash-linear-attention", "fla"),
                          ("triton", "triton"), ("peft", "peft")):
        try:
            found[name] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def check_statistics(stats: StateStatistics, loaded: LoadedModel) -> None:
    """Saved statistics must describe the model's linear-attention layers exactly."""
    mixers = linear_layers(loaded.model, loaded.family)
    layers = sorted(mixers)
    heads = [mixers[i].num_v_heads for i in layers]
    if stats.layers != layers or stats.heads != heads:
        raise CompressorError(
            f"the statistics describe layers {stats.layers} with {stats.heads} heads, but the model has layers "
            f"{layers} with {heads} heads; run `compress analyze` on this model."
        )
    shapes = [(mixers[i].head_k_dim, mixers[i].head_v_dim) for i in layers]
    if [tuple(shape) for shape in stats.state_shapes] != shapes:
        raise CompressorError(
            f"the statistics describe states of shapes {[tuple(x) for x in stats.state_shapes]} (d_k, d_v) per "
            f"layer, but the model's are {shapes}; run `compress analyze` on this model."
        )


def base_model_id(source: str, explicit: str | None) -> str:
    """The Hub id the card names: ``explicit``, else the id in a Hub cache path, else ``source`` as given."""
    if explicit is not None:
        return explicit
    found = HUB_CACHE_PATH.search(Path(source).expanduser().resolve().as_posix()) if Path(source).exists() else None
    return f"{found.group(1)}/{found.group(2)}" if found else source


def source_license(loaded: LoadedModel) -> str | None:
    """The licence of the source: its config's ``license``, else the ``license`` of its model card's front matter."""
    if getattr(loaded.model.config, "license", None):
        return loaded.model.config.license
    card = None
    if loaded.local_path is not None:
        card = loaded.local_path / "README.md"
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(loaded.source, "README.md")
        card = Path(cached) if isinstance(cached, str) else None
    if card is None or not card.is_file():
        return None
    from huggingface_hub.repocard import metadata_load

    try:
        licence = (metadata_load(card) or {}).get("license")
    except Exception:  # a card whose front matter is not YAML names no licence we can read
        return None
    return licence if isinstance(licence, str) else None


def layer_records(loaded: LoadedModel, kept: dict[int, list[int]], scores: dict[int, torch.Tensor],
                  stats: StateStatistics, channels: dict[int, dict[int, list[int]]] | None = None
                  ) -> dict[str, LayerRecord]:
    ranks, norms = stats.per_layer("threshold_rank"), stats.per_layer("nuclear_norm")
    records = {}
    for index, mixer in linear_layers(loaded.model, loaded.family).items():
        source = head_layout(mixer)
        after = pruned_layout(source, kept[index])
        records[str(index)] = LayerRecord(
            heads_before=source.num_value_heads,
            kept_heads=kept[index],
            key_heads_before=source.num_key_heads,
            kept_key_heads=sorted({source.value_to_key[j] for j in kept[index]}),
            value_to_key=explicit_value_to_key(after),
            kept_key_channels={str(key): kept for key, kept in channels[index].items()} if channels else None,
            score=[round(float(x), 6) for x in scores[index]],
            rank=[round(float(x), 4) for x in ranks[index]],
            norm=[round(float(x), 6) for x in norms[index]],
        )
    return records


def build_record(loaded: LoadedModel, settings: PruneSettings, budget, measured, choice) -> CompressionRecord:
    """The record of pruning ``loaded`` by ``choice`` (a ``pipeline.Choice``) on ``measured`` statistics."""
    stats = measured.stats
    method = MethodRecord(name=settings.method, alpha=settings.alpha, remove=choice.remove, **budget.record(),
                          seed=settings.calibration.seed, loss_tokens=measured.loss_tokens)
    if settings.key_reduction is not None:
        method.key_reduction, method.key_method = settings.key_reduction, settings.key_method
        method.key_chosen, method.key_candidates = choice.key_chosen, choice.key_candidates
        key_dims = {m.head_k_dim for m in linear_layers(loaded.model, loaded.family).values()}
        method.key_dim_before = key_dims.pop()
        method.key_dim_after = choice.plan.key_dim(next(iter(choice.plan.kept)), method.key_dim_before)
    method.axes_candidates, method.axes_chosen = choice.axes_candidates, choice.axes_chosen
    if choice.chosen is not None:
        method.chosen, method.chosen_seed = choice.chosen.name, choice.chosen.seed
        method.auto_holdout, method.held_out_tokens = settings.auto_holdout, int(measured.held_out.numel())
        method.candidates = [candidate.summary() for candidate in choice.candidates]
    sizes = planned_sizes(loaded.model, loaded.family, choice.plan, loaded.save_dtype)
    return CompressionRecord(
        source=loaded.source,
        base_model=base_model_id(loaded.source, settings.base_model),
        family=loaded.model.config.model_type,
        license=source_license(loaded),
        method=method,
        calibration=CalibrationRecord(**{key: stats.settings.get(key) for key in
                                         ("source", "samples", "seq_len", "tokens", "eps")}),
        layers=layer_records(loaded, choice.plan.kept, choice.scores, stats, choice.plan.channels),
        dtype={"compute": str(loaded.model.dtype).removeprefix("torch."),
               "saved": str(loaded.save_dtype).removeprefix("torch.")},
        state_bytes_before=state_bytes(loaded),
        state_bytes_after=sizes["state_bytes_after"],
        params_before=parameter_count(loaded.model),
        params_after=sizes["params_after"],
        per_layer_heads=sizes["per_layer_heads"],
        layout=settings.layout,
        versions=versions(),
    )
