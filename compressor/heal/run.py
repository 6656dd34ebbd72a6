"""``heal_folder``, step by step: check the inputs, load the teacher and the text, (cache the teacher), train the
student, write the folder."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..outputs import scratch_folder
from .data import calib_batches, sample_windows, split_held_out, teacher_batches, training_windows
from .folder import write_healed
from .inputs import check_inputs
from .losses import held_out_kl
from .settings import HealSettings
from .topk_cache import TopKCache, cached_batches
from .training import prepare_student, round_to, train


def _same_path(first: str | Path, second: str | Path) -> bool:
    first, second = Path(first).expanduser(), Path(second).expanduser()
    return first.exists() and second.exists() and first.resolve() == second.resolve()


@dataclass
class Material:
    """What the student learns from: the teacher (None once its top-k is cached to disk), its tokenizer, the
    training and held-out windows [N, seq_len] of the calibration text, the evaluation windows, the top-k caches."""

    teacher: object
    tokenizer: object
    train_windows: object
    held_windows: object
    calib_source: str
    eval_tokens: object
    eval_data: str
    teacher_quality: object
    cache: TopKCache | None = None
    held_cache: TopKCache | None = None
    timer: dict = dataclasses.field(default_factory=dict)


@dataclass
class Outcome:
    """The healed student and the figures before and after training."""

    student: object
    save_dtype: object
    before: dict
    after: dict
    quality_before: object
    quality_after: object
    curve: list
    trained_parameters: int
    train_seconds: float
    cache_bytes: int | None


def load_material(teacher: str, settings: HealSettings, device: str) -> Material:
    """Load the teacher and cut the training, held-out and evaluation windows; the teacher's own figures."""
    from ..evaluation import eval_windows, quality
    from ..loading import load_model
    from ..settings import EvalSettings

    loaded = load_model(teacher, device, settings.teacher_dtype)
    model = loaded.model.eval().requires_grad_(False)
    windows, calib_source = training_windows(settings, loaded.tokenizer)
    train_windows, held_windows = split_held_out(windows, settings.held_out, settings.seed)
    evaluation = EvalSettings(settings.eval_path, settings.eval_samples, settings.eval_seq_len)
    eval_tokens, eval_data = eval_windows(evaluation, loaded.tokenizer, "--eval-")
    return Material(model, loaded.tokenizer, train_windows, held_windows, calib_source, eval_tokens, eval_data,
                    quality(model, eval_tokens, progress=False))


def cache_teacher(material: Material, settings: HealSettings, root: Path) -> None:
    """Run the teacher first: its top-k log-probabilities on every training and held-out window go to disk under
    ``root``, then the teacher is freed (``settings.teacher_top_k``, for a teacher that does not fit beside the
    student)."""
    import torch

    material.cache = TopKCache(root / "train", settings.teacher_top_k)
    material.held_cache = TopKCache(root / "held_out", settings.teacher_top_k)
    for folder in (root / "train", root / "held_out"):
        folder.mkdir(parents=True, exist_ok=True)
    material.held_cache.add(material.teacher, material.held_windows)
    if settings.data == "calib":
        for part in material.train_windows.split(64):
            material.cache.add(material.teacher, part)
    else:
        needed, call = settings.steps * settings.batch_size, 0
        while len(material.cache) < needed:
            count = min(max(settings.sample_batch_size, settings.batch_size), needed - len(material.cache))
            begun = time.perf_counter()
            samples = sample_windows(material.teacher, material.tokenizer, count, settings.seq_len,
                                     settings.temperature, settings.seed * 100_003 + call)
            material.timer["sampling_seconds"] = material.timer.get("sampling_seconds", 0.0) + time.perf_counter() - begun
            material.cache.add(material.teacher, samples)
            call += 1
    material.teacher = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def training_batches(material: Material, settings: HealSettings) -> Iterator:
    if material.cache is not None:
        return cached_batches(material.cache, settings.batch_size, settings.seed, shuffle=settings.data == "calib")
    if settings.data == "calib":
        return calib_batches(material.train_windows, settings.batch_size, settings.seed)
    return teacher_batches(material.teacher, material.tokenizer, settings, material.timer)


def train_student(pruned_dir: Path, material: Material, settings: HealSettings, device: str,
                  progress: bool) -> Outcome:
    """Load the pruned folder as the student in float32, train it on the material, merge any LoRA adapters and
    round its weights to the checkpoint's dtype; the held-out KL and the evaluation figures before and after."""
    from ..evaluation import quality
    from ..loading import load_model

    loaded = load_model(str(pruned_dir), device, "float32")
    student = loaded.model
    held_cached = None if material.held_cache is None else material.held_cache.all()[1]

    def measure() -> dict:
        return held_out_kl(student, material.held_windows, material.teacher, held_cached, settings.batch_size)

    before, quality_before = measure(), quality(student, material.eval_tokens, progress=False)
    peft_model, trainable = prepare_student(student, loaded.family, settings)
    started = time.perf_counter()
    curve = train(student, trainable, training_batches(material, settings), settings, material.teacher, measure,
                  progress)
    train_seconds = time.perf_counter() - started
    if peft_model is not None:
        student = peft_model.merge_and_unload()
    student.eval().requires_grad_(False)
    round_to(student, loaded.save_dtype)  # the figures after are those of the weights as written
    cache_bytes = None if material.cache is None else material.cache.bytes + material.held_cache.bytes
    return Outcome(student, loaded.save_dtype, before, measure(), quality_before,
                   quality(student, material.eval_tokens, progress=False), curve,
                   sum(p.numel() for p in trainable), train_seconds, cache_bytes)


def recovery_entry(teacher: str, record, settings: HealSettings, material: Material, outcome: Outcome,
                   device: str) -> dict:
    """``compression.json``'s ``recovery``: what was trained, on what, and the figures before and after."""
    from ..accounting import versions

    teacher_ppl, before, after = (material.teacher_quality.perplexity, outcome.quality_before.perplexity,
                                  outcome.quality_after.perplexity)
    sampling = material.timer.get("sampling_seconds")
    return {
        "teacher": teacher,
        "teacher_is_base": _same_path(teacher, record.source) or teacher == record.source,
        "data": settings.data,
        "data_source": material.calib_source if settings.data == "calib" else
        f"samples from the teacher (one-token prompt, temperature {settings.temperature}, no top-k/top-p)",
        "tokens": settings.steps * settings.batch_size * settings.seq_len,
        "steps": settings.steps, "seq_len": settings.seq_len, "batch_size": settings.batch_size,
        "train": settings.train, "method": settings.method, "lora_rank": settings.lora_rank or None,
        "lora_alpha": (settings.lora_alpha or 2 * settings.lora_rank) if settings.lora_rank else None,
        "trained_parameters": outcome.trained_parameters,
        "loss": "KL(teacher || student)" + (f" + {settings.lm_weight} x next-token loss" if settings.lm_weight else ""),
        "lr": settings.lr,
        "optimizer": f"AdamW (betas 0.9, 0.95; weight decay {settings.weight_decay}; gradient norm clipped at "
                     f"{settings.max_grad_norm}), 5 % linear warm-up, cosine decay to 10 %",
        "teacher_top_k": settings.teacher_top_k, "cache_bytes": outcome.cache_bytes,
        "held_out": {"windows": int(material.held_windows.shape[0]), "tokens": int(material.held_windows.numel()),
                     "source": material.calib_source,
                     "kl": "full" if settings.teacher_top_k is None else f"top-{settings.teacher_top_k} + rest"},
        "kl_before": outcome.before["kl"], "kl_after": outcome.after["kl"],
        "loss_before": outcome.before["loss"], "loss_after": outcome.after["loss"],
        "curve": outcome.curve,
        "eval": {
            "perplexity_teacher": teacher_ppl, "perplexity_before": before, "perplexity_after": after,
            "recall_accuracy_teacher": material.teacher_quality.recall_accuracy,
            "recall_accuracy_before": outcome.quality_before.recall_accuracy,
            "recall_accuracy_after": outcome.quality_after.recall_accuracy,
            "gap_recovered": (before - after) / (before - teacher_ppl) if before > teacher_ppl else None,
            "data": material.eval_data, "tokens": int(material.eval_tokens.numel()),
        },
        "device": device, "train_seconds": round(outcome.train_seconds, 2),
        "sampling_seconds": None if sampling is None else round(sampling, 2),
        "versions": versions(), "seed": settings.seed,
    }


def heal_folder(pruned_dir: str | Path, teacher: str, out_dir: str | Path, settings: HealSettings | None = None, *,
                overwrite: bool = False, command: str | None = None, progress: bool = True):
    """Distil ``teacher`` (the unpruned source: folder or Hub id) into the pruned folder ``pruned_dir`` and write
    the healed model to ``out_dir`` (atomically: nothing is written on failure). Returns the new record, a
    ``compressor.record.CompressionRecord`` whose ``recovery`` entry describes the healing.

    Every input is checked before a weight loads: the pruned folder must hold a ``compression.json``, the teacher
    must have the pruned model's architecture and tokenizer, and ``settings.check()`` must pass.
    """
    import torch

    from ..loading import resolve_device

    settings = settings or HealSettings()
    pruned_dir, out_dir = Path(pruned_dir), Path(out_dir)
    record = check_inputs(pruned_dir, teacher, out_dir, settings, overwrite)
    started = time.perf_counter()
    device = str(resolve_device(settings.device))
    torch.manual_seed(settings.seed)
    material = load_material(teacher, settings, device)
    with contextlib.ExitStack() as stack:  # a temporary cache goes when training ends (or fails)
        if settings.teacher_top_k is not None:
            root = (Path(settings.cache_dir).expanduser() if settings.cache_dir
                    else stack.enter_context(scratch_folder(out_dir, "heal-cache")))
            cache_teacher(material, settings, root)
        outcome = train_student(pruned_dir, material, settings, device, progress)
    recovery = recovery_entry(teacher, record, settings, material, outcome, device)
    if record.recovery is not None:
        recovery["previous"] = record.recovery
    healed = dataclasses.replace(record, recovery=recovery, verify=None)  # the pruned weights' check is not these
    teacher_path = Path(teacher).expanduser()
    write_healed(healed, outcome, pruned_dir, out_dir, settings, overwrite,
                 [pruned_dir, teacher_path if teacher_path.exists() else None], command, started)
    return healed
