"""``compress analyze`` and ``compress prune`` as short sequences of named steps over typed values.

check settings ─▶ load ─▶ statistics ─▶ choose heads ─▶ choose channels ─▶ evaluate before ─▶ slim ─▶ evaluate after
─▶ write ─▶ push
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from dataclasses import replace

import torch

from .accounting import build_record, check_statistics, head_state_bytes, parameter_count, state_bytes
from .calibration import StateStatistics, collect_state_statistics
from .calibration_text import calibration_windows, check_source
from .errors import CompressorError
from .evaluation import eval_record, eval_windows, quality
from .layerwise_checks import layer_by_layer_quality
from .export import write_folder
from .loading import LoadedModel, load_layer_by_layer, load_model, load_structure, resolve_device, resolve_dtype
from . import outputs
from .outputs import check_free_space, staging_folder
from .model_source import local_folder_of
from .placement import max_memory
from .preflight import check_prune_inputs
from .record import CompressionRecord
from .selection import Candidate, choose_plan, loss_scores, loss_windows, split_windows
from .sequential import memory_budget, weights_bytes
from .evaluation import next_token_loss
from .settings import (ACTIVATION_KEY_METHODS, KEY_METHODS, SCORE_METHODS, CalibrationSettings, PruneSettings,
                       check_memory_sizes)
from .layers import PruningPlan, linear_layers
from .slicing import slim
from .streaming import check_streamable
from .tuned_kernels import recorded_fla_configs


@dataclass
class Measurements:
    """What the choice of heads rests on: state statistics and, for ``loss`` and ``auto``, measured losses."""

    stats: StateStatistics
    loss: dict[int, torch.Tensor] | None = None
    """Layer -> [H] increase of the calibration loss when each head alone is masked."""
    held_out: torch.Tensor | None = None
    """``auto``: the held-out calibration windows [N, L] it compares the rules on."""
    scoring: torch.Tensor | None = None
    """With ``held_out``: the calibration windows [N, L] the choices are made on."""
    loss_tokens: int | None = None


@dataclass
class Choice:
    scores: dict[int, torch.Tensor]
    plan: PruningPlan
    remove: str
    chosen: Candidate | None = None
    candidates: list[Candidate] | None = None
    key_chosen: str | None = None
    """``--key-method auto``: the channel method it chose."""
    key_candidates: list[dict] | None = None
    """``--key-method auto``: every channel method's held-out loss and perplexity."""
    axes_candidates: list[dict] | None = None
    """``--key-reduction auto``: every split of the budget between heads and channels, with its held-out loss."""
    axes_chosen: str | None = None
    """``--key-reduction auto``: the split it wrote (``heads``, ``channels`` or ``channels and heads``)."""


@dataclass
class PruneResult:
    plan: PruningPlan
    record: CompressionRecord
    out_dir: Path | None
    model: torch.nn.Module = field(repr=False)
    pushed: str | None = None
    """The Hub commit URL, after ``push_to_hub``."""


@recorded_fla_configs()
def analyze(
    model: str | LoadedModel,
    calibration: CalibrationSettings | None = None,
    out_dir: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = True,
    overwrite: bool = False,
    max_gpu_memory: str | None = None,
    max_cpu_memory: str | None = None,
    device_map: str | None = None,
) -> StateStatistics:
    """Measure every linear-attention head's state on the calibration text.

    With ``out_dir``, also keep the statistics of each half of the samples (for the consistency figures, from the
    same forward passes) and write ``stats.safetensors``, ``report.json``, ``report.md`` and the figures
    atomically; an existing non-empty ``out_dir`` is refused unless ``overwrite`` and ``compressor`` wrote it.
    """
    calibration = calibration or CalibrationSettings()
    calibration.check()
    check_memory_sizes(max_gpu_memory, max_cpu_memory)
    if out_dir is not None:
        check_output(Path(out_dir), overwrite, model)
    check_source(calibration.calib, calibration.text_field)
    loaded = model if isinstance(model, LoadedModel) else load(model, device, dtype, max_gpu_memory, max_cpu_memory,
                                                               device_map=device_map)
    stats = calibrate(loaded, calibration, progress, halves=out_dir is not None)
    if out_dir is not None:
        from .analysis import write_report

        with staging_folder(Path(out_dir), overwrite, "analyze", [loaded.local_path]) as staging:
            stats.save(staging)
            write_report(stats, stats.halves, staging)
    return stats


def calibrate(loaded: LoadedModel, calibration: CalibrationSettings, progress: bool = True,
              windows: torch.Tensor | None = None, halves: bool = False) -> StateStatistics:
    """State statistics on ``windows`` [N, L] (default: the calibration text's windows)."""
    source = None
    if windows is None:
        windows, source = calibration_windows(calibration, loaded.tokenizer)
    stats = collect_state_statistics(loaded.model, loaded.family, windows, calibration.batch_size, calibration.eps,
                                     progress=progress, times=calibration.times(), halves=halves,
                                     layer_by_layer=loaded.layer_by_layer)
    steps = "log" if calibration.steps == "log" else f"every {calibration.every} tokens"
    stats.settings.update(source=source, seed=calibration.seed, model=loaded.source, packing=calibration.packing,
                          steps=steps)
    return stats


def check_output(out_dir: Path, overwrite: bool, model: str | LoadedModel) -> None:
    """``outputs.check_output`` of ``out_dir``, which must not be ``model``'s folder."""
    outputs.check_output(out_dir, overwrite, [local_folder(model)])


def load(model: str, device: str, dtype: str, max_gpu_memory: str | None, max_cpu_memory: str | None,
         settings: PruneSettings | None = None, device_map: str | None = None) -> LoadedModel:
    """The whole model on the device; spread over the GPUs by ``device_map`` (prune: ``settings.device_map``),
    within the limits per device; or, when ``--max-gpu-memory`` / ``--max-cpu-memory`` leave the device less than
    its weights, the model to run one decoder layer at a time from its files (``compressor.sequential``),
    ``settings`` (prune) then checked for steps that need the whole model."""
    device_map = settings.device_map if settings is not None else device_map
    if device_map is not None:
        limits = max_memory(max_gpu_memory, max_cpu_memory, torch.cuda.device_count())
        return load_model(model, device, dtype, device_map=device_map, max_memory=limits)
    budget = memory_budget(resolve_device(device), max_gpu_memory, max_cpu_memory)
    folder = local_folder(model)
    if budget is None:
        return load_model(model, device, dtype)
    if folder is None:
        raise CompressorError("--max-gpu-memory and --max-cpu-memory read the weights layer by layer from a local "
                              "model folder; download the model first.")
    structure = load_structure(str(folder))
    compute = resolve_dtype(dtype, structure.save_dtype, resolve_device(device))
    if weights_bytes(folder, structure.save_dtype, compute) <= budget:
        return load_model(model, device, dtype)
    if settings is not None:
        check_layer_by_layer(settings)
    return load_layer_by_layer(model, device, dtype, budget)


def check_layer_by_layer(settings: PruneSettings) -> None:
    """Refuse what needs the whole model at once when it runs one layer at a time; stream the export."""
    if settings.method in ("auto", "loss"):
        raise CompressorError(f"--method {settings.method} measures losses through the whole model, which does not "
                              "fit in --max-gpu-memory/--max-cpu-memory; name a statistics score (e.g. --method norm).")
    if settings.key_reduction is not None:
        raise CompressorError("--key-reduction chooses channels from every layer's queries and keys in one pass of the "
                              "whole model, which does not fit in --max-gpu-memory/--max-cpu-memory; drop the limit or "
                              "--key-reduction.")
    settings.export = "stream"


def local_folder(model: str | LoadedModel) -> Path | None:
    """The model's local folder, or None for a Hub id."""
    return model.local_path if isinstance(model, LoadedModel) else local_folder_of(model)


@recorded_fla_configs()
def prune(model: str | LoadedModel, out_dir: str | Path | None, settings: PruneSettings | None = None, *,
          command: str | None = None, progress: bool = True) -> PruneResult:
    """Remove linear-attention heads chosen by ``settings.method`` within its budget and write ``out_dir``
    (weights, config, code, tokenizer, ``compression.json``, model card) atomically unless ``settings.dry_run``;
    push it when ``settings.push_to_hub``. Returns the plan, the record and the pruned model (in memory)."""
    settings = settings or PruneSettings()
    out_dir = None if out_dir is None else Path(out_dir)
    budget = check_prune_inputs(local_folder(model), out_dir, settings)
    saved_stats = StateStatistics.load(settings.stats) if settings.stats is not None else None
    loaded = model_to_prune(model, settings, budget, saved_stats)
    if settings.export == "stream" and not settings.dry_run:
        check_streamable(loaded.model, loaded.family)
    head_bytes = head_state_bytes(loaded)
    mixers = linear_layers(loaded.model, loaded.family)
    budget, kept_dim = fitted_budget(loaded, budget, settings)
    eval_tokens = None
    if settings.evaluation is not None and not settings.dry_run:
        eval_tokens, eval_data = eval_windows(settings.evaluation, loaded.tokenizer, "--eval-")
    if settings.key_reduction == "auto":
        from .key_channels import check_key_reduction

        check_key_reduction(loaded.family, mixers, 0.5)  # channels can go (one d_k everywhere): else one sentence
        measured = measure(loaded, settings, saved_stats, progress)
        settings, choice = choose_axes(loaded, measured, budget, head_bytes, settings)
    elif settings.removes_heads:
        measured = measure(loaded, settings, saved_stats, progress)
        choice = choose(loaded, measured, budget, head_bytes, settings)
    else:
        measured, choice = every_head(loaded, settings, saved_stats, progress)
    if kept_dim is not None:
        choice.plan.channels, choice.key_chosen, choice.key_candidates = plan_channels(loaded, settings, choice.plan,
                                                                                      kept_dim)
    record = build_record(loaded, settings, budget, measured, choice)
    if settings.dry_run:
        return PruneResult(choice.plan, record, None, loaded.model)

    written = None
    if eval_tokens is not None:
        batch = settings.evaluation.batch_size
        if loaded.layer_by_layer is None:
            before = quality(loaded.model, eval_tokens, batch, progress, "perplexity before")
        else:  # after: on the written folder, layer by layer too
            before = layer_by_layer_quality(loaded.layer_by_layer, eval_tokens, batch)
            written = evaluate_written(record, before, eval_data, eval_tokens, settings)
    slim(loaded.model, loaded.family, choice.plan)
    if eval_tokens is not None and loaded.layer_by_layer is None:
        after = quality(loaded.model, eval_tokens, batch, progress, "perplexity after")
        record.eval = eval_record(before, after, eval_data, eval_tokens)
    if (record.state_bytes_after, record.params_after) != (state_bytes(loaded), parameter_count(loaded.model)):
        raise CompressorError("internal error: the pruned model's size differs from the plan's; nothing was written.")
    check_free_space(out_dir, record.params_after * loaded.save_dtype.itemsize + 2**26)
    write_folder(loaded, record, measured.stats, choice, out_dir, settings, command, written)
    pushed = None
    if settings.push_to_hub is not None:
        from .hub import push_written

        pushed = push_written(out_dir, settings.push_to_hub, private=settings.private)
    return PruneResult(choice.plan, record, out_dir, loaded.model, pushed)


def model_to_prune(model: str | LoadedModel, settings: PruneSettings, budget,
                   saved_stats: StateStatistics | None) -> LoadedModel:
    """``model`` as ``prune`` needs it: as given where it is loaded already; its structure alone (the meta device)
    for a dry run that scores heads from saved statistics; else loaded with its weights, after a budget it cannot
    meet has been refused from its config (a local folder)."""
    if isinstance(model, LoadedModel):
        return model
    if (settings.dry_run and saved_stats is not None and settings.method in SCORE_METHODS
            and settings.key_reduction is None):
        return load_structure(model)
    if local_folder(model) is not None:
        check_budget_early(model, budget, settings)
    return load(model, settings.device, settings.dtype, settings.max_gpu_memory, settings.max_cpu_memory, settings)


def fitted_budget(loaded: LoadedModel, budget, settings: PruneSettings):
    """(``budget`` fitted to ``loaded``'s layers, for heads alone where ``settings`` also remove a share of
    query/key channels; the query/key channels kept per key head, or None), refused in one sentence where the model
    cannot meet it. ``loaded`` may be the model's structure alone (``load_structure``)."""
    mixers = linear_layers(loaded.model, loaded.family)
    budget = budget.fitted({i: tuple(m.value_to_key) for i, m in mixers.items()})
    kept_dim = None
    if settings.key_reduction not in (None, "auto"):
        from .key_channels import check_key_reduction, heads_share

        kept_dim = check_key_reduction(loaded.family, mixers, settings.key_reduction)
        if settings.removes_heads:
            key_dim = next(iter(mixers.values())).head_k_dim
            budget = replace(budget, state_reduction=heads_share(budget.state_reduction, kept_dim / key_dim))
    try:
        budget.check_model({i: m.num_v_heads for i, m in mixers.items()}, head_state_bytes(loaded))
    except CompressorError as error:
        if kept_dim is None or not settings.removes_heads:
            raise
        raise CompressorError(f"{str(error).rstrip('.')}, or raise --key-reduction (heads must remove "
                              f"{budget.state_reduction:.1%} of the state the channels leave for --state-reduction "
                              f"{settings.state_reduction} in all).") from None
    return budget, kept_dim


def check_budget_early(model: str, budget, settings: PruneSettings) -> None:
    """Refuses, in one sentence, a budget the local folder ``model`` cannot meet, from its config alone. A folder
    whose structure cannot be built from its config is left for ``load_model`` to explain."""
    try:
        structure = load_structure(model)
    except CompressorError:
        return
    fitted_budget(structure, budget, settings)


def evaluate_written(record: CompressionRecord, before, data: str, tokens: torch.Tensor, settings: PruneSettings):
    """Layer by layer: a step for the written folder (before its record is written) that measures it on ``tokens``
    and records it with ``before``."""
    from .layerwise_checks import runner_for

    def measure_folder(folder: Path) -> None:
        runner = runner_for(folder, settings.device, settings.dtype, memory_of(settings))
        after = layer_by_layer_quality(runner, tokens, settings.evaluation.batch_size)
        record.eval = eval_record(before, after, data, tokens)

    return measure_folder


def memory_of(settings: PruneSettings) -> int:
    """The device's memory limit of ``settings`` (layer by layer)."""
    return memory_budget(resolve_device(settings.device), settings.max_gpu_memory, settings.max_cpu_memory)


def measure(loaded: LoadedModel, settings: PruneSettings, stats: StateStatistics | None,
            progress: bool) -> Measurements:
    """Statistics (saved ones, checked against the model, or calibrated) and, for ``loss`` and ``auto``, each head's
    measured loss increase; ``--method auto`` and ``--key-reduction auto`` hold out part of the windows to compare
    their candidates on (everything else is measured on the rest)."""
    if stats is not None:
        check_statistics(stats, loaded)
    holds_out = settings.method == "auto" or settings.key_reduction == "auto"
    if settings.method not in ("auto", "loss") and not holds_out:
        return Measurements(stats if stats is not None else calibrate(loaded, settings.calibration, progress))
    tokens, source = calibration_windows(settings.calibration, loaded.tokenizer)
    scoring, held_out = split_windows(tokens, settings.auto_holdout) if holds_out else (tokens, None)
    if stats is None:
        stats = calibrate(loaded, settings.calibration, progress, windows=scoring)
        stats.settings["source"] = source
    if settings.method not in ("auto", "loss"):
        return Measurements(stats, held_out=held_out, scoring=scoring)
    windows = loss_windows(scoring, settings.loss_samples, settings.loss_seq_len)
    loss = loss_scores(loaded.model, loaded.family, windows, settings.loss_batch_size, progress=progress)
    return Measurements(stats, loss, held_out, scoring if holds_out else None, int(windows.numel()))


def every_head(loaded: LoadedModel, settings: PruneSettings, stats: StateStatistics | None,
               progress: bool) -> tuple[Measurements, Choice]:
    """Channels only: the statistics (for the record and the card) and a plan that keeps every head, scored by
    state norm."""
    if stats is not None:
        check_statistics(stats, loaded)
    else:
        stats = calibrate(loaded, settings.calibration, progress)
    return Measurements(stats), every_head_kept(loaded, stats, settings)


def every_head_kept(loaded: LoadedModel, stats: StateStatistics, settings: PruneSettings) -> Choice:
    """A plan that keeps every head, scored by state norm (for the record and the card)."""
    from .scoring import score_heads

    kept = {i: list(range(m.num_v_heads)) for i, m in linear_layers(loaded.model, loaded.family).items()}
    scores = score_heads(stats, "norm", settings.alpha, settings.calibration.seed)
    return Choice(scores, PruningPlan(kept=kept), settings.end)


def plan_channels(loaded: LoadedModel, settings: PruneSettings, plan: PruningPlan, kept_dim: int,
                  windows: torch.Tensor | None = None, memo: dict | None = None
                  ) -> tuple[dict[int, dict[int, list[int]]], str | None, list[dict] | None]:
    """The ``kept_dim`` query/key channels of every key head that ``plan`` keeps, by ``settings.key_method``
    (``rrqr``, ``wanda`` and ``taylor`` read activations or gradients on the calibration windows, of the model
    before any head is removed; ``windows``: these calibration windows instead; ``memo``: a dict that keeps those
    measurements for the next call on the same windows). ``auto`` chooses every way on the windows
    ``--auto-holdout`` leaves, and keeps the one whose channels (with ``plan``'s heads) give the lowest next-token
    loss on the held-out ones. Returns (channels, the method ``auto`` chose or None, every method's held-out loss
    and perplexity or None)."""
    from .key_channels import channel_gradients, choose_channels, collect_key_activations
    from .selection import masked_channels, masked_heads

    model, family, calibration = loaded.model, loaded.family, settings.calibration
    mixers = linear_layers(model, family)
    kept_keys = {i: sorted({m.value_to_key[j] for j in plan.kept[i]}) for i, m in mixers.items()}
    methods = [m for m in KEY_METHODS if m != "auto"] if settings.key_method == "auto" else [settings.key_method]
    activations = held_out = None
    memo = {} if memo is None else memo
    if set(ACTIVATION_KEY_METHODS) & set(methods) and "activations" not in memo:
        if windows is None:
            windows, _ = calibration_windows(calibration, loaded.tokenizer)
        if settings.key_method == "auto":
            windows, held_out = split_windows(windows, settings.auto_holdout)
        memo["held_out"] = held_out
        memo["activations"] = collect_key_activations(model, family, windows, calibration.batch_size,
                                                      calibration.seed)
        if "taylor" in methods:
            memo["activations"].gradients = channel_gradients(model, family, windows, calibration.batch_size)
    activations, held_out = memo.get("activations"), memo.get("held_out")
    choices = {method: choose_channels(model, family, method, kept_dim, kept_keys, activations, calibration.seed)
               for method in methods}
    if held_out is None:
        return choices[settings.key_method], None, None
    losses = {}
    for method, channels in choices.items():
        with masked_heads(model, family, plan.kept), masked_channels(model, family, channels):
            losses[method] = next_token_loss(model, held_out, calibration.batch_size, progress=False)
    chosen = min(losses, key=losses.get)
    tried = [{"method": m, "loss": round(loss, 6), "perplexity": round(math.exp(loss), 4)} for m, loss in losses.items()]
    return choices[chosen], chosen, tried


def choose_axes(loaded: LoadedModel, measured: Measurements, budget, head_bytes: dict[int, int],
                settings: PruneSettings) -> tuple[PruneSettings, Choice]:
    """``--key-reduction auto``: the state budget S taken by heads alone, by channels alone (⌊(1 − S)·d_k⌋ kept in
    every key head) and by both (channels first, to ⌈(1 − S/2)·d_k⌉, heads for the rest); each plan is made as
    ``--method`` and ``--key-method`` make it, on the scoring windows only (their own ``auto`` comparisons hold out
    a share of those), and the one with the lowest next-token loss on the held-out windows (its heads and channels
    masked) is kept. Returns the settings of that plan (its ``key_reduction``, None for heads alone) and its
    choice, carrying every split's loss."""
    from .key_channels import heads_share, kept_key_dim
    from .selection import masked_channels, masked_heads

    mixers = linear_layers(loaded.model, loaded.family)
    key_dim = next(iter(mixers.values())).head_k_dim
    target = budget.state_reduction
    splits = {"heads": None}
    half = kept_key_dim(key_dim, target / 2)
    if half < key_dim and 1 - half / key_dim < target:
        splits["channels and heads"] = half
    if math.floor(round((1 - target) * key_dim, 9)) >= 1:
        splits["channels"] = math.floor(round((1 - target) * key_dim, 9))
    for_heads = measured
    if settings.method == "auto":  # the rules are compared on windows the splits are not compared on
        _, inner = split_windows(measured.scoring, settings.auto_holdout)
        for_heads = replace(measured, held_out=inner)
    tried, plans, memo = [], {}, {}
    for name, kept_dim in splits.items():
        reduction = None if kept_dim is None else 1 - kept_dim / key_dim
        options = replace(settings, key_reduction=reduction, state_reduction=None if name == "channels" else target)
        if name == "channels":
            choice = every_head_kept(loaded, measured.stats, settings)
        else:
            share = target if kept_dim is None else heads_share(target, kept_dim / key_dim)
            choice = choose(loaded, for_heads, replace(budget, state_reduction=share), head_bytes, options)
        if kept_dim is not None:
            choice.plan.channels, choice.key_chosen, choice.key_candidates = plan_channels(
                loaded, options, choice.plan, kept_dim, windows=measured.scoring, memo=memo)
        with masked_heads(loaded.model, loaded.family, choice.plan.kept), \
                masked_channels(loaded.model, loaded.family, choice.plan.channels or {}):
            loss = next_token_loss(loaded.model, measured.held_out, settings.calibration.batch_size, progress=False)
        head_rule = choice.chosen.name if choice.chosen is not None else settings.method
        tried.append({"axes": name, "key_reduction": None if reduction is None else round(reduction, 6),
                      "heads": None if name == "channels" else head_rule,
                      "key_method": choice.key_chosen or (None if kept_dim is None else settings.key_method),
                      "loss": round(loss, 6), "perplexity": round(math.exp(loss), 4)})
        plans[name] = (options, choice)
    best = min(tried, key=lambda entry: entry["loss"])["axes"]
    options, choice = plans[best]
    choice.axes_candidates, choice.axes_chosen = tried, best
    return options, choice


def choose(loaded: LoadedModel, measured: Measurements, budget, head_bytes: dict[int, int],
           settings: PruneSettings) -> Choice:
    """The heads to keep: by the method's scores within the budget, or (``auto``) the candidate plan with the
    lowest held-out loss."""
    from .scoring import score_heads

    if settings.method == "auto":
        chosen, tried = choose_plan(loaded.model, loaded.family, measured.stats, measured.loss, measured.held_out,
                                    head_bytes, budget, settings.alpha, settings.calibration.seed,
                                    settings.calibration.batch_size)
        return Choice(chosen.scores, chosen.plan, chosen.remove, chosen, tried)
    if settings.method == "loss":
        scores = measured.loss
    else:
        scores = score_heads(measured.stats, settings.method, settings.alpha, settings.calibration.seed)
    return Choice(scores, budget.plan(scores, head_bytes, settings.end), settings.end)
