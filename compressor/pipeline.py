"""The calibrate-then-compress pipeline behind ``compress analyze`` and ``compress prune``.

load ─▶ calibrate ─▶ statistics ─▶ score ─▶ plan ─▶ slim ─▶ export ─▶ verify ─▶ (push)
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from . import __version__
from .calibration import (
    PACKINGS,
    StateStatistics,
    check_source,
    collect_state_statistics,
    measured_steps,
    read_documents,
    read_text,
    token_windows,
)
from .errors import CompressorError
from .evaluation import copy_recall, max_logit_difference, perplexity, recall_spans
from .export import copy_tokenizer_files, staging_folder, check_output_folder, write_json, write_model
from .loading import LoadedModel, load_model
from .budgets import make_budget
from .scoring import check_method, score_heads
from .selection import (LOSS_SEQ_LEN, LOSS_WINDOWS, PRUNE_METHODS, choose_plan, held_out_count, loss_scores, loss_windows,
                        split_windows)
from .slicing import PruningPlan, explicit_value_to_key, head_layout, linear_layers, planned_sizes, pruned_layout, slim

VERIFY_TOLERANCE = 1e-4


@dataclass
class CalibrationSettings:
    calib: str | None = None
    samples: int = 16
    seq_len: int = 2048
    batch_size: int = 4
    seed: int = 0
    eps: float = 1e-4
    text_field: str = "text"
    """JSON Lines field, or Hub dataset column, that holds the text."""
    split: str = "train"
    """Split of a Hub dataset (``calib='hf:ID[:CONFIG]'``)."""
    packing: str = "pack"
    """``pack``: documents joined, windows cut across them; ``truncate``: each long-enough document's first
    ``seq_len`` tokens (shorter documents skipped)."""
    every: int = 64
    """Tokens between measured state boundaries (a multiple of 64)."""
    steps: str = "every"
    """``every``: a boundary every ``every`` tokens; ``log``: at 64, 128, 256, … tokens (and the last token)."""

    def check(self) -> None:
        for name in ("samples", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise CompressorError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if self.packing not in PACKINGS:
            raise CompressorError(f"--packing must be one of {', '.join(PACKINGS)}, got '{self.packing}'.")
        self.times()

    def times(self) -> list[int]:
        """Token counts at which states are measured (:func:`calibration.measured_steps`)."""
        return measured_steps(self.seq_len, self.every, self.steps)

    def tokens(self, tokenizer) -> tuple[torch.Tensor, str]:
        """(calibration windows [samples, seq_len], description of the source)."""
        documents, source = read_documents(self.calib, self.text_field, self.split, 16 * self.samples * self.seq_len)
        tokens = token_windows(tokenizer, documents, self.samples, self.seq_len, self.seed, packing=self.packing)
        return tokens, source


@dataclass
class PruneResult:
    plan: PruningPlan
    record: dict
    out_dir: Path | None
    model: torch.nn.Module = field(repr=False)
    candidates: list[dict] | None = None
    """With ``method='auto'``: every candidate rule's held-out loss and perplexity (``Candidate.summary``)."""


def analyze(
    model: str | LoadedModel,
    calibration: CalibrationSettings | None = None,
    out_dir: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = True,
    overwrite: bool = False,
) -> StateStatistics:
    """Measure every linear-attention head's state on the calibration text.

    With ``out_dir``, also calibrate on each half of the samples (for the consistency figures; the statistics
    themselves come from all samples) and write ``stats.safetensors``, ``report.json``, ``report.md`` and the
    figures atomically; an existing non-empty ``out_dir`` is refused unless ``overwrite``.
    """
    calibration = calibration or CalibrationSettings()
    calibration.check()
    if out_dir is not None:
        check_output_folder(Path(out_dir), overwrite)
    check_source(calibration.calib, calibration.text_field)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device, dtype)
    tokens, source = calibration.tokens(loaded.tokenizer)

    def collect(windows: torch.Tensor) -> StateStatistics:
        stats = collect_state_statistics(
            loaded.model, loaded.family, windows, calibration.batch_size, calibration.eps, progress=progress,
            times=calibration.times(),
        )
        stats.settings.update(source=source, seed=calibration.seed, model=loaded.source, packing=calibration.packing,
                              steps="log" if calibration.steps == "log" else f"every {calibration.every} tokens")
        return stats

    stats = collect(tokens)
    if out_dir is not None:
        from .analysis import write_report

        half = len(tokens) // 2
        halves = (collect(tokens[:half]), collect(tokens[half:])) if half else None
        with staging_folder(Path(out_dir), overwrite) as staging:
            stats.save(staging)
            write_report(stats, halves, staging)
    return stats


def check_shard_size(max_shard_size: str) -> None:
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        parse_size_to_int(max_shard_size)
    except ValueError:
        raise CompressorError(f"--max-shard-size must look like 2GB or 500MB, got '{max_shard_size}'.") from None


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


def state_bytes(model: torch.nn.Module, family, dtype: torch.dtype) -> int:
    """Bytes of the recurrent states of one sequence (all linear-attention layers, model dtype)."""
    element = torch.empty((), dtype=dtype).element_size()
    return sum(m.num_v_heads * m.head_k_dim * m.head_v_dim * element for m in linear_layers(model, family).values())


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def versions() -> dict[str, str | None]:
    found = {"compressor": __version__}
    for package, name in (("torch", "torch"), ("transformers", "transformers"), ("flash-linear-attention", "fla"),
                          ("triton", "triton")):
        try:
            found[name] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _layer_records(loaded, plan, scores, stats) -> dict[str, dict]:
    ranks, norms = stats.per_layer("threshold_rank"), stats.per_layer("nuclear_norm")
    records = {}
    for index, mixer in linear_layers(loaded.model, loaded.family).items():
        source = head_layout(mixer)
        after = pruned_layout(source, plan.kept[index])
        records[str(index)] = {
            "heads_before": source.num_value_heads,
            "kept_heads": plan.kept[index],
            "key_heads_before": source.num_key_heads,
            "kept_key_heads": sorted({source.value_to_key[j] for j in plan.kept[index]}),
            "value_to_key": explicit_value_to_key(after),
            "score": [round(float(x), 6) for x in scores[index]],
            "rank": [round(float(x), 4) for x in ranks[index]],
            "norm": [round(float(x), 6) for x in norms[index]],
        }
    return records


def prune(
    model: str | LoadedModel,
    out_dir: str | Path | None,
    state_reduction: float | None = None,
    method: str = "joint",
    alpha: float = 0.5,
    remove: str = "high",
    min_heads_per_layer: int = 1,
    budget: str = "global",
    heads_per_layer: str | dict[int, int] | None = None,
    protect_layers: str | tuple[int, ...] = (),
    loss_samples: int = LOSS_WINDOWS,
    loss_seq_len: int = LOSS_SEQ_LEN,
    loss_batch_size: int = 16,
    calibration: CalibrationSettings | None = None,
    stats: str | Path | StateStatistics | None = None,
    auto_holdout: float = 0.25,
    eval_path: str | Path | None = None,
    eval_samples: int | None = None,
    eval_seq_len: int = 1024,
    device: str = "auto",
    dtype: str = "auto",
    dry_run: bool = False,
    verify: bool = True,
    overwrite: bool = False,
    max_shard_size: str = "2GB",
    command: str | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    progress: bool = True,
) -> PruneResult:
    """Remove linear-attention heads chosen by ``method`` within a budget (``compressor.budgets``): the recurrent
    state shrinks by ``state_reduction`` (default 0.389) over the whole model (``budget='global'``) or in every
    layer alike (``'uniform'``), or each layer keeps ``heads_per_layer[layer]`` heads; ``protect_layers`` are
    never pruned.

    Writes ``out_dir`` (weights, config, code, tokenizer, ``compression.json``, model card) atomically unless
    ``dry_run``, then pushes it to the Hub as ``push_to_hub`` when given; returns the plan, the record and the
    pruned model (in memory).

    ``method='loss'`` scores each head by how much masking it alone raises the next-token loss on
    ``loss_samples`` × ``loss_seq_len`` calibration tokens, in ceil((heads + 1) × loss_samples / loss_batch_size)
    batched forward passes (``selection.loss_scores``). ``method='auto'`` holds out ``auto_holdout`` of the
    calibration windows, scores heads on the rest, and keeps the plan (of every rule × both ends, and random
    with 3 seeds) whose masked model has the lowest held-out loss; ``remove`` is then ignored and ``stats``
    refused.
    """
    calibration = calibration or CalibrationSettings()
    calibration.check()
    check_method(method, alpha, PRUNE_METHODS)
    if method == "auto":
        if stats is not None:
            raise CompressorError("--method auto calibrates on its own scoring windows; drop --stats.")
        held_out_count(calibration.samples, auto_holdout)
    head_budget = make_budget(budget, state_reduction, heads_per_layer, protect_layers, min_heads_per_layer)
    for option, value, least in (("--loss-samples", loss_samples, 1), ("--loss-seq-len", loss_seq_len, 2),
                                 ("--loss-batch-size", loss_batch_size, 1)):
        if value < least:
            raise CompressorError(f"{option} must be at least {least}, got {value}.")
    if dry_run and push_to_hub is not None:
        raise CompressorError("--push-to-hub uploads the written folder, and --dry-run writes none; drop one of them.")
    if not dry_run:
        if out_dir is None:
            raise CompressorError("an output folder (--out) is required unless --dry-run is given.")
        check_output_folder(Path(out_dir), overwrite)
    if eval_path is not None and not Path(eval_path).is_file():
        raise CompressorError(f"evaluation file {eval_path} does not exist.")
    if eval_samples is not None and eval_samples < 1:
        raise CompressorError(f"--eval-samples must be at least 1, got {eval_samples}.")
    if eval_seq_len < 2:
        raise CompressorError(f"--eval-seq-len must be at least 2, got {eval_seq_len}.")
    check_shard_size(max_shard_size)
    if isinstance(stats, (str, Path)):
        stats = StateStatistics.load(Path(stats))
    if stats is None or method == "loss":
        check_source(calibration.calib, calibration.text_field)  # a missing calibration file fails before the model loads

    loaded = model if isinstance(model, LoadedModel) else load_model(model, device, dtype)
    if out_dir is not None and loaded.local_path is not None and Path(out_dir).resolve() == loaded.local_path.resolve():
        raise CompressorError("the output folder is the source model's folder; choose another --out.")
    mixers = linear_layers(loaded.model, loaded.family)
    element = torch.empty((), dtype=loaded.save_dtype).element_size()
    head_bytes = {i: m.head_k_dim * m.head_v_dim * element for i, m in mixers.items()}
    head_budget.check_model({i: m.num_v_heads for i, m in mixers.items()}, head_bytes)
    if stats is not None:
        check_statistics(stats, loaded)
    eval_tokens = None
    if eval_path is not None:
        text, _ = read_text(str(eval_path))
        eval_tokens = token_windows(loaded.tokenizer, text, eval_samples, eval_seq_len, 0, "--eval-samples")
    if method in ("auto", "loss"):
        tokens, source = calibration.tokens(loaded.tokenizer)
        scoring_tokens, held_out = split_windows(tokens, auto_holdout) if method == "auto" else (tokens, None)
        if stats is None:
            stats = collect_state_statistics(loaded.model, loaded.family, scoring_tokens, calibration.batch_size,
                                             calibration.eps, progress=progress, times=calibration.times())
            stats.settings.update(source=source, seed=calibration.seed, model=loaded.source)
        loss_tokens = loss_windows(scoring_tokens, loss_samples, loss_seq_len)
        loss = loss_scores(loaded.model, loaded.family, loss_tokens, loss_batch_size, progress=progress)
    if stats is None:
        stats = analyze(loaded, calibration, progress=progress)

    candidates = None
    if method == "auto":
        chosen, tried = choose_plan(loaded.model, loaded.family, stats, loss, held_out, head_bytes, head_budget,
                                    alpha, calibration.seed, calibration.batch_size)
        scores, plan, remove = chosen.scores, chosen.plan, chosen.remove
        candidates = [candidate.summary() for candidate in tried]
    else:
        scores = loss if method == "loss" else score_heads(stats, method, alpha, calibration.seed)
        plan = head_budget.plan(scores, head_bytes, remove)

    record = {
        "format": 1,
        "base_model": loaded.source,
        "family": loaded.model.config.model_type,
        "license": getattr(loaded.model.config, "license", None),
        "method": {"name": method, "alpha": alpha, "remove": remove, **head_budget.record(), "seed": calibration.seed},
        "calibration": {"source": stats.settings.get("source"), "samples": stats.settings.get("samples"),
                        "seq_len": stats.settings.get("seq_len"), "tokens": stats.settings.get("tokens"),
                        "eps": stats.settings.get("eps")},
        "layers": _layer_records(loaded, plan, scores, stats),
        "dtype": {"compute": str(loaded.model.dtype).removeprefix("torch."),
                  "saved": str(loaded.save_dtype).removeprefix("torch.")},
        "state_bytes_before": state_bytes(loaded.model, loaded.family, loaded.save_dtype),
        "params_before": parameter_count(loaded.model),
        **planned_sizes(loaded.model, loaded.family, plan, loaded.save_dtype),
        "versions": versions(),
    }

    if method in ("auto", "loss"):
        record["method"]["loss_tokens"] = int(loss_tokens.numel())
    if candidates is not None:
        record["method"].update(chosen=chosen.name, chosen_seed=chosen.seed, auto_holdout=auto_holdout,
                                held_out_tokens=int(held_out.numel()), candidates=candidates)

    if dry_run:
        return PruneResult(plan=plan, record=record, out_dir=None, model=loaded.model, candidates=candidates)

    if eval_tokens is not None:
        spans = recall_spans(eval_tokens)
        record["eval"] = {"perplexity_before": perplexity(loaded.model, eval_tokens, progress=progress, desc="perplexity before"),
                          "recall_accuracy_before": copy_recall(loaded.model, spans)}
    slim(loaded.model, loaded.family, plan)
    if eval_tokens is not None:
        after = perplexity(loaded.model, eval_tokens, progress=progress, desc="perplexity after")
        record["eval"].update(perplexity_after=after, recall_accuracy_after=copy_recall(loaded.model, spans),
                              recall_probe=f"{spans.shape[0]} spans of {spans.shape[1]} evaluation tokens, each "
                                           "repeated; greedy accuracy on the second copy",
                              data=str(eval_path), tokens=int(eval_tokens.numel()))
    if (record["state_bytes_after"], record["params_after"]) != (
        state_bytes(loaded.model, loaded.family, loaded.save_dtype), parameter_count(loaded.model)
    ):
        raise CompressorError("internal error: the pruned model's size differs from the plan's; nothing was written.")

    out_dir = Path(out_dir)
    cast_parameters(loaded.model, loaded.save_dtype)
    with staging_folder(out_dir, overwrite) as staging:
        write_model(loaded.model, loaded.family, staging, max_shard_size)
        copy_tokenizer_files(loaded.local_path, staging, loaded.tokenizer.save_pretrained)
        if verify:
            record["verify"] = verify_folder(loaded.model, staging, verification_tokens(loaded.model.config))
        write_json(staging / "compression.json", record)
        from .analysis import write_card_figures
        from .card import render_card

        figures = write_card_figures(stats, staging, scores, plan.kept, record["method"].get("chosen", method))
        (staging / "README.md").write_text(render_card(
            record, command=command, figures=figures, repo_id=push_to_hub, text_model_of=loaded.text_model_of
        ))
    if push_to_hub is not None:
        from .hub import push_folder

        record["pushed"] = push_folder(out_dir, push_to_hub, private=private)
    return PruneResult(plan=plan, record=record, out_dir=out_dir, model=loaded.model, candidates=candidates)


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast floating-point parameters (not buffers such as rotary frequencies) to ``dtype``, as loading does."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            parameter.data = parameter.data.to(dtype)
    model.config.dtype = dtype


def verification_tokens(config, shape: tuple[int, int] = (2, 256)) -> torch.Tensor:
    """Seeded random token ids [2, 256]: comparing logits needs no meaningful text."""
    return torch.randint(config.vocab_size, shape, generator=torch.Generator().manual_seed(0))


def verify_folder(model: torch.nn.Module, folder: Path, tokens: torch.Tensor) -> dict:
    """Reload ``folder`` through its shipped code and compare its logits with ``model``'s; raise on a mismatch."""
    reloaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=model.dtype)
    reloaded = reloaded.to(next(model.parameters()).device).eval()
    difference = max_logit_difference(model, reloaded, tokens)
    if not difference <= VERIFY_TOLERANCE:
        raise CompressorError(f"verification failed: the reloaded model's logits differ by {difference:.3g}.")
    return {"max_abs_logit_diff": difference, "passed": True, "tokens": int(tokens.numel())}
