"""Recovery after pruning: distil the unpruned source (the teacher) into a pruned folder (the student).

``compress heal PRUNED --teacher SOURCE --out DIR`` trains the pruned model to match the teacher's next-token
distributions and writes a normal pruned folder again (same shipped code, same config and head counts, tokenizer
files, ``compression.json`` with a ``recovery`` entry, the model card re-rendered).

Loss. KL(teacher ‖ student) summed over the vocabulary and averaged over every position of every window, at
temperature 1 (optionally plus ``lm_weight`` × the next-token cross-entropy). The teacher's whole distribution
carries far more signal per token than the one observed next token (the pruned model already predicts text
almost as well as the source; what it lost is the shape of the distribution), it needs no labels, so it works
on text sampled from the teacher itself, and its minimum is the teacher: the student is pulled back towards the
model it was cut from rather than towards the calibration text, which matters when that text is small (the
embedded one is about 80k tokens). The forward direction KL(p_teacher ‖ q_student) is the cross-entropy against
soft labels, mass-covering, the usual choice for distillation from a stronger model (Minitron, Hinton et al.).
A hidden-state term would tie the student to the teacher's internal representation layer by layer; it is not
used: the pruned layers' outputs are meant to differ (their heads are gone) and only the output matters.

Memory. The teacher runs per batch beside the student, under ``torch.no_grad`` in eval mode; its logits exist
for one batch at a time, and both models' logits only for ``POSITIONS_PER_CHUNK`` positions at a time (the loss
goes through the output heads in checkpointed chunks, so a 248k vocabulary costs no [B, T, V] tensor with
autograd history). A teacher too big to sit beside the student is run first instead (``teacher_top_k``): its
top-k log-probabilities (float16) and token ids (int32) at every position of every training window are cached to
disk, 6·k bytes per token (k = 64: 384 bytes per token, 384 MB per million training positions), the teacher is
freed, then the student trains on the cache with the KL between the two distributions coarse-grained to the
teacher's k tokens plus one bin for the rest of the vocabulary (a lower bound of the full KL).

CUDA. fla 0.6's backward kernels fail on Hopper with triton 3.6, so the student's training forward and backward
run inside :func:`torch_recurrences`, which sends the recurrences of ``compressor.modeling`` (gated delta rule,
delta rule, GLA, KDA) to their PyTorch chunked forms, which autograd differentiates. Inference (teacher, sampling,
evaluation) keeps fla's kernels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import CompressorError
from .preflight import check_pruned_folder, check_teacher_location

TRAIN_GROUPS = ("linear", "all")
DATA_SOURCES = ("calib", "teacher")
POSITIONS_PER_CHUNK = 1024
"""Positions whose full-vocabulary logits exist at once in the loss (per model)."""
RECURRENCE_MODULES = ("gated_delta", "delta_rule", "gla", "kda")
"""Modules of ``compressor.modeling`` whose recurrences dispatch CUDA tensors to fla when ``HAS_FLA``."""
WEIGHT_FILES = re.compile(r".*\.safetensors(\.index\.json)?$|.*\.bin$|.*\.bin\.index\.json$")


@dataclass
class HealSettings:
    """What ``heal_folder`` trains, on what, and how long. Defaults were chosen on the bundled fixture
    (docs/healing.md, scripts/heal_curve.py)."""

    tokens: int = 1_000_000
    """Training tokens the student sees (steps = ceil(tokens / (batch_size · seq_len)))."""
    train: str = "all"
    """Parameter group trained: ``linear`` (the linear-attention mixers) or ``all`` (every parameter)."""
    lora_rank: int = 0
    """> 0: LoRA adapters of this rank on the group's linear layers (peft; merged into the weights before writing);
    0: full fine-tuning of the group."""
    lora_alpha: float | None = None
    """LoRA scale numerator (None: 2 × rank)."""
    data: str = "calib"
    """``calib``: windows of the calibration text; ``teacher``: text sampled from the teacher."""
    calib: str | None = None
    """Calibration source, as ``--calib`` (None: the embedded Python-docs text)."""
    text_field: str = "text"
    split: str = "train"
    packing: str = "pack"
    lr: float = 1e-4
    """Peak learning rate (AdamW; linear warm-up over the first 5 % of steps, cosine decay to 10 % of it)."""
    weight_decay: float = 0.0
    seq_len: int = 512
    batch_size: int = 8
    lm_weight: float = 0.0
    """Weight of the next-token cross-entropy added to the KL."""
    temperature: float = 1.0
    """Sampling temperature of ``data='teacher'`` (the KL itself is always at temperature 1)."""
    sample_batch_size: int = 64
    """Sequences the teacher samples per ``generate`` call (``data='teacher'``)."""
    held_out: int = 8
    """Calibration windows held out from training to track the KL to the teacher."""
    curve_points: int = 8
    """Times the held-out KL is measured during training (besides before and after)."""
    eval_path: str | None = None
    """Text for held-out perplexity and copy recall before and after (None: the embedded evaluation text)."""
    eval_samples: int | None = None
    eval_seq_len: int = 1024
    teacher_top_k: int | None = None
    """Set: run the teacher first and train on its cached top-k log-probabilities (a teacher that does not fit
    beside the student)."""
    cache_dir: str | None = None
    """Folder for the top-k cache (None: a temporary folder beside the output, removed at the end)."""
    device: str = "auto"
    teacher_dtype: str = "auto"
    """Teacher compute dtype (auto: the checkpoint's on a GPU, float32 on the CPU); the student trains in float32."""
    seed: int = 0
    max_grad_norm: float = 1.0
    verify: bool = True

    def check(self) -> None:
        """Raise a CompressorError (one sentence) for a value that cannot run."""
        for name, least in (("tokens", 1), ("seq_len", 2), ("batch_size", 1), ("sample_batch_size", 1),
                            ("held_out", 1), ("eval_seq_len", 2), ("lora_rank", 0), ("curve_points", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise CompressorError(f"--{name.replace('_', '-')} must be an integer of at least {least}, got {value!r}.")
        if self.train not in TRAIN_GROUPS:
            raise CompressorError(f"--train must be one of {', '.join(TRAIN_GROUPS)}, got '{self.train}'.")
        if self.data not in DATA_SOURCES:
            raise CompressorError(f"--data must be one of {', '.join(DATA_SOURCES)}, got '{self.data}'.")
        for name in ("lr", "temperature"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise CompressorError(f"--{name.replace('_', '-')} must be a positive number, got {value!r}.")
        for name in ("lm_weight", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise CompressorError(f"--{name.replace('_', '-')} must be a number of at least 0, got {value!r}.")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise CompressorError(f"--lora-alpha must be positive, got {self.lora_alpha!r}.")
        if self.eval_samples is not None and self.eval_samples < 1:
            raise CompressorError(f"--eval-samples must be at least 1, got {self.eval_samples}.")
        if self.teacher_top_k is not None and self.teacher_top_k < 1:
            raise CompressorError(f"--teacher-top-k must be at least 1, got {self.teacher_top_k}.")
        if self.eval_path is not None and not Path(self.eval_path).is_file():
            raise CompressorError(f"evaluation file {self.eval_path} does not exist.")

    @property
    def steps(self) -> int:
        return math.ceil(self.tokens / (self.batch_size * self.seq_len))

    @property
    def method(self) -> str:
        """``lora`` or ``full``."""
        return "lora" if self.lora_rank > 0 else "full"


# Input checks (before any weights load) --------------------------------------------------------------------


def read_pruned_record(pruned_dir: Path):
    """The ``compression.json`` record (``compressor.record.CompressionRecord``) of a folder that ``compress prune``
    wrote; refuse anything else in one sentence."""
    from .record import CompressionRecord

    check_pruned_folder(pruned_dir)
    return CompressionRecord.read(pruned_dir)


def _text_config(name: str):
    from transformers import AutoConfig, PretrainedConfig

    from .families.fla_support import require_fla

    try:
        require_fla(PretrainedConfig.get_config_dict(name)[0].get("model_type"))
        return AutoConfig.from_pretrained(name).get_text_config()
    except OSError as error:
        raise CompressorError(f"could not load the config of '{name}' (offline, or not on the Hub): {error}") from None
    except ValueError as error:  # an unknown model type, a malformed config
        raise CompressorError(f"the config of '{name}' cannot be read: {str(error).splitlines()[0]}") from None


def _base_type(model_type: str) -> str:
    return model_type.removesuffix("_per_layer")


def check_teacher(teacher: str, pruned_dir: Path, record) -> None:
    """Refuse a teacher of another architecture or another tokenizer than the pruned model's (configs and
    tokenizers only; no weights load)."""
    from transformers import AutoTokenizer

    check_teacher_location(teacher, pruned_dir)
    student_config = _text_config(str(pruned_dir))
    teacher_config = _text_config(teacher)
    wanted = _base_type(record.family)
    if _base_type(teacher_config.model_type) != wanted:
        raise CompressorError(
            f"teacher {teacher} is a '{teacher_config.model_type}' model but the pruned model was cut from a "
            f"'{wanted}' model; the teacher must have the same architecture (the source it was pruned from)."
        )
    if teacher_config.vocab_size != student_config.vocab_size:
        raise CompressorError(
            f"teacher {teacher} has a vocabulary of {teacher_config.vocab_size} tokens and the pruned model "
            f"{student_config.vocab_size}; distillation needs the same tokenizer."
        )
    try:
        teacher_tokenizer = AutoTokenizer.from_pretrained(teacher)
        student_tokenizer = AutoTokenizer.from_pretrained(str(pruned_dir))
    except (OSError, ValueError) as error:
        raise CompressorError(f"could not load the tokenizers of the teacher and the pruned model: {error}") from None
    if (teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab()
            or teacher_tokenizer.all_special_ids != student_tokenizer.all_special_ids):
        raise CompressorError(
            f"teacher {teacher} has another tokenizer than the pruned model (the vocabularies or special tokens "
            "differ); distillation needs the same tokenizer."
        )


# The recurrences' dispatch while training ------------------------------------------------------------------


@contextlib.contextmanager
def torch_recurrences() -> Iterator[None]:
    """Within the block, CUDA tensors take the PyTorch chunked recurrences of ``compressor.modeling`` instead of
    fla's kernels (their ``HAS_FLA`` flag is cleared and restored after): fla 0.6's backward kernels fail on Hopper
    with triton 3.6, and the PyTorch forms are differentiable. Only models built from ``compressor.modeling`` (as
    ``load_model`` loads them) are affected; a model loaded through a folder's shipped code reads its own copy."""
    saved = {}
    for name in RECURRENCE_MODULES:
        module = importlib.import_module(f"compressor.modeling.{name}")
        if hasattr(module, "HAS_FLA"):
            saved[module] = module.HAS_FLA
            module.HAS_FLA = False
    try:
        yield
    finally:
        for module, value in saved.items():
            module.HAS_FLA = value


# Losses -----------------------------------------------------------------------------------------------------


def _kl_chunk(student_hidden, head, teacher_hidden, teacher_head, targets, lm_weight):
    """Sums over one chunk of positions: (KL(teacher ‖ student), cross-entropy) in float32."""
    import torch
    import torch.nn.functional as F

    student = F.log_softmax(head(student_hidden).float(), dim=-1)
    with torch.no_grad():
        teacher = F.log_softmax(teacher_head(teacher_hidden).float(), dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum()
    ce = F.nll_loss(student, targets, ignore_index=-100, reduction="sum") if lm_weight else student.new_zeros(())
    return kl, ce


def _topk_kl_chunk(student_hidden, head, top_logprobs, top_ids, targets, lm_weight):
    """Sums over one chunk: (KL between teacher and student coarse-grained to the teacher's top k + the rest,
    cross-entropy)."""
    import torch
    import torch.nn.functional as F

    student = F.log_softmax(head(student_hidden).float(), dim=-1)
    teacher_top = top_logprobs.float()
    student_top = student.gather(-1, top_ids.long())
    teacher_rest = torch.log1p(-teacher_top.exp().sum(-1).clamp(max=1 - 1e-6))
    student_rest = torch.log1p(-student_top.exp().sum(-1).clamp(max=1 - 1e-6))
    kl = (teacher_top.exp() * (teacher_top - student_top)).sum() + (teacher_rest.exp() * (teacher_rest - student_rest)).sum()
    ce = F.nll_loss(student, targets, ignore_index=-100, reduction="sum") if lm_weight else student.new_zeros(())
    return kl, ce


def _targets(ids):
    """Next-token targets [B·T]; the last position of each window has none (-100)."""
    import torch

    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    return targets.flatten()


def distillation_loss(student, ids, teacher=None, cached=None, lm_weight: float = 0.0, grad: bool = True):
    """(KL per position, cross-entropy per predicted token) of ``student`` on ``ids`` [B, T] against the live
    ``teacher`` or the ``cached`` (top log-probs [B, T, k], ids [B, T, k]); hidden states go through the output
    heads ``POSITIONS_PER_CHUNK`` positions at a time, each chunk checkpointed when ``grad``."""
    import torch
    from torch.utils.checkpoint import checkpoint

    hidden = student.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state.flatten(0, 1)
    head = student.get_output_embeddings()
    targets = _targets(ids)
    chunks = hidden.split(POSITIONS_PER_CHUNK)
    target_chunks = targets.split(POSITIONS_PER_CHUNK)
    if cached is None:
        with torch.no_grad():
            teacher_hidden = teacher.get_decoder()(input_ids=ids.to(teacher.device), use_cache=False).last_hidden_state
        teacher_chunks = teacher_hidden.flatten(0, 1).to(hidden.device).split(POSITIONS_PER_CHUNK)
        teacher_head = teacher.get_output_embeddings()
        extra = [(chunk,) for chunk in teacher_chunks]
        function = lambda h, t, y: _kl_chunk(h, head, t, teacher_head, y, lm_weight)  # noqa: E731
    else:
        top_logprobs, top_ids = (x.to(hidden.device).flatten(0, 1) for x in cached)
        extra = list(zip(top_logprobs.split(POSITIONS_PER_CHUNK), top_ids.split(POSITIONS_PER_CHUNK)))
        function = lambda h, p, i, y: _topk_kl_chunk(h, head, p, i, y, lm_weight)  # noqa: E731
    kl_total, ce_total = hidden.new_zeros((), dtype=torch.float32), hidden.new_zeros((), dtype=torch.float32)
    for chunk, more, target in zip(chunks, extra, target_chunks):
        if grad and len(chunks) > 1:
            kl, ce = checkpoint(function, chunk, *more, target, use_reentrant=False)
        else:
            kl, ce = function(chunk, *more, target)
        kl_total, ce_total = kl_total + kl, ce_total + ce
    predicted = max(int((targets != -100).sum()), 1)
    return kl_total / hidden.shape[0], ce_total / predicted


def held_out_kl(student, windows, teacher=None, cached=None, batch_size: int = 8) -> dict:
    """Mean KL(teacher ‖ student) per position and the student's next-token loss on held-out ``windows``."""
    import torch

    was_training = student.training
    student.eval()
    kl_sum, ce_sum, positions, predicted = 0.0, 0.0, 0, 0
    device = next(student.parameters()).device
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size].to(device)
            part = None if cached is None else tuple(x[start : start + batch_size] for x in cached)
            kl, ce = distillation_loss(student, ids, teacher, part, lm_weight=1.0, grad=False)
            kl_sum += kl.item() * ids.numel()
            ce_sum += ce.item() * ids[:, 1:].numel()
            positions += ids.numel()
            predicted += ids[:, 1:].numel()
    student.train(was_training)
    return {"kl": kl_sum / positions, "loss": ce_sum / predicted}


# Data --------------------------------------------------------------------------------------------------------


def training_windows(settings: HealSettings, tokenizer):
    """(windows [N, seq_len] of the calibration text, every whole one in order, description)."""
    from .calibration import read_documents, token_windows

    documents, source = read_documents(settings.calib, settings.text_field, settings.split,
                                       None if settings.calib is None or not settings.calib.startswith("hf:")
                                       else 4 * settings.tokens * 8)
    windows = token_windows(tokenizer, documents, None, settings.seq_len, 0, "--held-out", settings.packing)
    if windows.shape[0] < settings.held_out + (1 if settings.data == "calib" else 0):
        raise CompressorError(
            f"the calibration text gives {windows.shape[0]} windows of {settings.seq_len} tokens, too few for "
            f"{settings.held_out} held-out windows{' and training' if settings.data == 'calib' else ''}; lower "
            "--held-out or --seq-len, or give more text."
        )
    return windows, source


def split_held_out(windows, held_out: int, seed: int):
    """(training windows, held-out windows): ``held_out`` windows chosen with ``seed``."""
    import torch

    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed + 1))
    return windows[order[held_out:].sort().values], windows[order[:held_out].sort().values]


def calib_batches(windows, batch_size: int, seed: int) -> Iterator:
    """Batches [batch_size, seq_len] of ``windows`` in a new seeded order each epoch, forever."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(windows.shape[0], generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield windows[order[start : start + batch_size]]
        if len(order) < batch_size:
            yield windows[order.repeat(math.ceil(batch_size / len(order)))[:batch_size]]


def prompt_ids(tokenizer) -> list[int]:
    """The one-token prompt the teacher samples from: the beginning-of-text token (or end-of-text, or pad)."""
    for token in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if token is not None:
            return [token]
    raise CompressorError("the tokenizer has no beginning-, end-of-text or pad token to start teacher samples from; "
                          "use --data calib.")


def sample_windows(teacher, tokenizer, count: int, seq_len: int, temperature: float, generator_seed: int):
    """``count`` windows [count, seq_len] sampled from ``teacher`` (ancestral sampling at ``temperature``, no
    top-k/top-p; end-of-text may be sampled but does not stop a sequence)."""
    import torch

    prompt = prompt_ids(tokenizer)
    device = next(teacher.parameters()).device
    ids = torch.tensor([prompt] * count, device=device)
    torch.manual_seed(generator_seed)
    new = seq_len - len(prompt)
    with torch.no_grad():
        out = teacher.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                               max_new_tokens=new, min_new_tokens=new, eos_token_id=None,
                               pad_token_id=prompt[0], use_cache=True)
    return out[:, :seq_len].cpu()


def teacher_batches(teacher, tokenizer, settings: HealSettings, timer: dict) -> Iterator:
    """Batches of fresh teacher samples, generated ``sample_batch_size`` sequences at a time."""
    call = 0
    while True:
        started = time.perf_counter()
        pool = sample_windows(teacher, tokenizer, max(settings.sample_batch_size, settings.batch_size),
                              settings.seq_len, settings.temperature, settings.seed * 100_003 + call)
        timer["sampling_seconds"] = timer.get("sampling_seconds", 0.0) + time.perf_counter() - started
        call += 1
        for start in range(0, pool.shape[0] - settings.batch_size + 1, settings.batch_size):
            yield pool[start : start + settings.batch_size]


# Top-k cache -------------------------------------------------------------------------------------------------


class TopKCache:
    """Windows and the teacher's top-k log-probabilities at each of their positions, in safetensors files of
    ``group`` windows each (float16 log-probabilities and int32 token ids: 6·k bytes per position)."""

    def __init__(self, folder: Path, k: int):
        self.folder, self.k = folder, k
        self.files: list[Path] = []
        self.sizes: list[int] = []

    def add(self, teacher, windows) -> None:
        """Run ``teacher`` on ``windows`` [n, T] (in batches of 8) and append their top-k to the cache."""
        import torch
        import torch.nn.functional as F
        from safetensors.torch import save_file

        device = next(teacher.parameters()).device
        logprobs, ids = [], []
        with torch.no_grad():
            for batch in windows.split(8):
                hidden = teacher.get_decoder()(input_ids=batch.to(device), use_cache=False).last_hidden_state
                head = teacher.get_output_embeddings()
                for chunk in hidden.flatten(0, 1).split(POSITIONS_PER_CHUNK):
                    top = F.log_softmax(head(chunk).float(), dim=-1).topk(self.k, dim=-1)
                    logprobs.append(top.values.half().cpu())
                    ids.append(top.indices.int().cpu())
        shape = (*windows.shape, self.k)
        path = self.folder / f"part-{len(self.files):05d}.safetensors"
        save_file({"input_ids": windows.contiguous(), "top_logprobs": torch.cat(logprobs).view(shape).contiguous(),
                   "top_ids": torch.cat(ids).view(shape).contiguous()}, str(path))
        self.files.append(path)
        self.sizes.append(windows.shape[0])

    def __len__(self) -> int:
        return sum(self.sizes)

    @property
    def bytes(self) -> int:
        return sum(path.stat().st_size for path in self.files)

    def get(self, indices: list[int]):
        """(input ids [n, T], (top log-probs [n, T, k], top ids [n, T, k])) of the cached windows ``indices``."""
        import torch
        from safetensors import safe_open

        starts = [0]
        for size in self.sizes:
            starts.append(starts[-1] + size)
        rows = {"input_ids": [], "top_logprobs": [], "top_ids": []}
        for index in indices:
            part = next(i for i in range(len(self.sizes)) if starts[i] <= index < starts[i + 1])
            with safe_open(str(self.files[part]), framework="pt") as handle:
                for name in rows:
                    rows[name].append(handle.get_slice(name)[index - starts[part] : index - starts[part] + 1])
        ids, logprobs, top_ids = (torch.cat(rows[name]) for name in ("input_ids", "top_logprobs", "top_ids"))
        return ids, (logprobs, top_ids)

    def all(self):
        return self.get(list(range(len(self))))


def cached_batches(cache: TopKCache, batch_size: int, seed: int, shuffle: bool) -> Iterator:
    """Batches of the cache's windows: seeded epochs in a new order each (``shuffle``) or in order, forever."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(cache), generator=generator) if shuffle else torch.arange(len(cache))
        if len(order) < batch_size:  # fewer windows than a batch: repeat them
            order = order.repeat(math.ceil(batch_size / len(order)))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield cache.get(order[start : start + batch_size].tolist())


# What is trained ---------------------------------------------------------------------------------------------


def group_prefixes(model, family, group: str) -> list[str]:
    """Module-name prefixes of the trained group: the linear-attention mixers, or the whole model ('')."""
    if group == "all":
        return [""]
    from .layers import linear_layers

    names = {id(module): name for name, module in model.named_modules()}
    return [names[id(mixer)] + "." for mixer in linear_layers(model, family).values()]


def _in_group(name: str, prefixes: list[str]) -> bool:
    return any(name.startswith(prefix) for prefix in prefixes)


def lora_targets(model, family, group: str) -> list[str]:
    """Names of the ``nn.Linear`` modules of the group, the output head excluded."""
    from torch import nn

    head = model.get_output_embeddings()
    prefixes = group_prefixes(model, family, group)
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module is not head and _in_group(name + ".", prefixes)]


def prepare_student(model, family, settings: HealSettings):
    """Make the group trainable (LoRA adapters injected in place, or its own parameters); freeze the rest.
    Returns (peft model or None, trainable parameters)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if settings.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        targets = lora_targets(model, family, settings.train)
        if not targets:
            raise CompressorError(f"the model has no linear layers in the group '{settings.train}' for LoRA.")
        config = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha or 2 * settings.lora_rank,
                            target_modules=targets, lora_dropout=0.0, bias="none")
        peft_model = get_peft_model(model, config)
        trainable = [p for n, p in model.named_parameters() if "lora_" in n]
        for parameter in trainable:
            parameter.requires_grad_(True)
        return peft_model, trainable
    prefixes = group_prefixes(model, family, settings.train)
    trainable = [p for n, p in model.named_parameters() if _in_group(n, prefixes) and p.is_floating_point()]
    for parameter in trainable:
        parameter.requires_grad_(True)
    return None, trainable


def schedule(steps: int):
    """Linear warm-up over the first 5 % of ``steps``, then cosine decay to 10 % of the peak."""
    warmup = max(1, round(0.05 * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _unpack(batch):
    """A batch is input ids [B, T], or (input ids, cached top-k) from a :class:`TopKCache`."""
    return batch if isinstance(batch, tuple) else (batch, None)


def train(model, trainable, batches: Iterator, settings: HealSettings, teacher=None, measure=None,
          progress: bool = True) -> list[dict]:
    """``settings.steps`` AdamW steps on the distillation loss; ``measure()`` (held-out figures) runs
    ``settings.curve_points`` times along the way. Returns the curve [{tokens, step, kl, loss, train_kl}]."""
    import torch
    from tqdm.auto import tqdm

    steps = settings.steps
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, betas=(0.9, 0.95), weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(steps))
    points = {min(steps, round(steps * (i + 1) / settings.curve_points)) for i in range(settings.curve_points)}
    points.discard(steps)  # the final figures are measured after the weights are rounded and written
    curve, running = [], []
    device = next(model.parameters()).device
    model.train()
    bar = tqdm(range(steps), desc="healing", unit="step", disable=not progress)
    for step in bar:
        ids, cached = _unpack(next(batches))
        ids = ids.to(device)
        with torch_recurrences():
            kl, ce = distillation_loss(model, ids, teacher, cached, settings.lm_weight)
            loss = kl + settings.lm_weight * ce if settings.lm_weight else kl
            loss.backward()
        if settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running.append(kl.item())
        bar.set_postfix(kl=f"{kl.item():.4f}")
        if step + 1 in points and measure is not None:
            figures = measure()
            curve.append({"tokens": (step + 1) * settings.batch_size * settings.seq_len, "step": step + 1,
                          **figures, "train_kl": sum(running) / len(running)})
            running = []
            model.train()
    model.eval()
    return curve


# Evaluation and output ---------------------------------------------------------------------------------------


def round_to(model, dtype) -> None:
    """Round the floating-point parameters to ``dtype`` and back to their own dtype (what writing them does)."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            parameter.data = parameter.data.to(dtype).to(parameter.dtype)


def _card_figures(pruned_dir: Path) -> list[str]:
    """Figure paths the pruned folder's card shows, in its order, that exist."""
    card = pruned_dir / "README.md"
    if not card.is_file():
        return []
    found = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", card.read_text())
    return [path for path in dict.fromkeys(found) if not Path(path).is_absolute() and (pruned_dir / path).is_file()]


def _card_command(pruned_dir: Path) -> str | None:
    """The command of the pruned folder's card (its "Reproduce" block)."""
    card = pruned_dir / "README.md"
    if not card.is_file():
        return None
    match = re.search(r"## Reproduce\s+```bash\n(.*?)\n```", card.read_text(), re.S)
    return match.group(1) if match else None


def write_folder(model, pruned_dir: Path, staging: Path, save_dtype) -> None:
    """Write the healed weights into ``staging`` beside every other file that compressor wrote in ``pruned_dir``
    (config, shipped code, tokenizer, figures; a user's own additions stay behind), unchanged; ``README.md`` and
    ``compression.json`` are left to the caller."""
    import torch

    from .outputs import MARKER, written_paths

    marker = pruned_dir / MARKER
    listed = json.loads(marker.read_text())["files"] if marker.is_file() else written_paths(pruned_dir)
    for relative in listed:
        parts = PurePosixPath(relative).parts
        if not parts or PurePosixPath(relative).is_absolute() or ".." in parts:
            continue  # a marker naming a place outside the folder is not one compressor wrote
        name = parts[0]
        if name in ("README.md", "compression.json") or WEIGHT_FILES.match(name) or name.startswith("."):
            continue
        if (pruned_dir / relative).is_file():
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(pruned_dir / relative, staging / relative)
    for parameter in model.parameters():
        if parameter.is_floating_point():
            parameter.data = parameter.data.to(save_dtype)
    with tempfile.TemporaryDirectory(dir=staging.parent, prefix=".heal-weights-") as weights:
        model.save_pretrained(weights)
        for item in Path(weights).iterdir():
            if WEIGHT_FILES.match(item.name):
                shutil.move(str(item), staging / item.name)
    for parameter in model.parameters():
        if parameter.is_floating_point():
            parameter.data = parameter.data.to(torch.float32)


def _same_path(first: str | Path, second: str | Path) -> bool:
    first, second = Path(first).expanduser(), Path(second).expanduser()
    return first.exists() and second.exists() and first.resolve() == second.resolve()


# The command, step by step -----------------------------------------------------------------------------------


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
    cache_root: Path | None = None
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


def check_inputs(pruned_dir: Path, teacher: str, out_dir: Path, settings: HealSettings, overwrite: bool):
    """Every input checked before a weight loads; returns the pruned folder's record."""
    from .calibration import check_source
    from .outputs import check_output

    settings.check()
    record = read_pruned_record(pruned_dir)
    check_output(out_dir, overwrite, [pruned_dir, Path(teacher).expanduser()])
    check_source(settings.calib, settings.text_field)
    check_teacher(teacher, pruned_dir, record)
    return record


def load_material(teacher: str, settings: HealSettings, device: str) -> Material:
    """Load the teacher and cut the training, held-out and evaluation windows; the teacher's own figures."""
    from .evaluation import eval_windows, quality
    from .loading import load_model
    from .settings import EvalSettings

    loaded = load_model(teacher, device, settings.teacher_dtype)
    model = loaded.model.eval().requires_grad_(False)
    windows, calib_source = training_windows(settings, loaded.tokenizer)
    train_windows, held_windows = split_held_out(windows, settings.held_out, settings.seed)
    evaluation = EvalSettings(settings.eval_path, settings.eval_samples, settings.eval_seq_len)
    eval_tokens, eval_data = eval_windows(evaluation, loaded.tokenizer, "--eval-")
    return Material(model, loaded.tokenizer, train_windows, held_windows, calib_source, eval_tokens, eval_data,
                    quality(model, eval_tokens, progress=False))


def cache_teacher(material: Material, settings: HealSettings, out_dir: Path) -> None:
    """Run the teacher first: its top-k log-probabilities on every training and held-out window go to disk, then
    the teacher is freed (``settings.teacher_top_k``, for a teacher that does not fit beside the student)."""
    import torch

    root = Path(settings.cache_dir) if settings.cache_dir else Path(
        tempfile.mkdtemp(prefix=".heal-cache-", dir=out_dir.parent if out_dir.parent.exists() else None))
    material.cache_root = root
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
    from .evaluation import quality
    from .loading import load_model

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
    from .accounting import versions

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


def write_healed(healed, outcome: Outcome, pruned_dir: Path, out_dir: Path, settings: HealSettings,
                 overwrite: bool, sources: list, command: str | None, started: float) -> None:
    """The output folder: the pruned folder's files with the healed weights, the reload check, the record and
    the card, staged and swapped in (``compressor.outputs``)."""
    from .card import render_card
    from .export import verify_folder, verification_tokens
    from .outputs import check_free_space, staging_folder

    weights = sum(p.numel() for p in outcome.student.parameters()) * outcome.save_dtype.itemsize
    check_free_space(out_dir, weights + 2**26)
    with staging_folder(out_dir, overwrite, "heal", sources) as staging:
        write_folder(outcome.student, pruned_dir, staging, outcome.save_dtype)
        if settings.verify:
            check = verify_folder(outcome.student, staging, verification_tokens(outcome.student.config, (2, 128)))
            healed.verify = check
        healed.recovery["wall_seconds"] = round(time.perf_counter() - started, 2)
        healed.write(staging)
        commands = list(dict.fromkeys(c for c in (_card_command(pruned_dir), command) if c))
        (staging / "README.md").write_text(render_card(healed, command="\n".join(commands) or None,
                                                       figures=_card_figures(pruned_dir)))


def heal_folder(pruned_dir: str | Path, teacher: str, out_dir: str | Path, settings: HealSettings | None = None, *,
                overwrite: bool = False, command: str | None = None, progress: bool = True):
    """Distil ``teacher`` (the unpruned source: folder or Hub id) into the pruned folder ``pruned_dir`` and write
    the healed model to ``out_dir`` (atomically: nothing is written on failure). Returns the new record, a
    ``compressor.record.CompressionRecord`` whose ``recovery`` entry describes the healing.

    Every input is checked before a weight loads: the pruned folder must hold a ``compression.json``, the teacher
    must have the pruned model's architecture and tokenizer, and ``settings.check()`` must pass.
    """
    import torch

    from .loading import resolve_device

    settings = settings or HealSettings()
    pruned_dir, out_dir = Path(pruned_dir), Path(out_dir)
    record = check_inputs(pruned_dir, teacher, out_dir, settings, overwrite)
    started = time.perf_counter()
    device = str(resolve_device(settings.device))
    torch.manual_seed(settings.seed)
    material = load_material(teacher, settings, device)
    try:
        if settings.teacher_top_k is not None:
            cache_teacher(material, settings, out_dir)
        outcome = train_student(pruned_dir, material, settings, device, progress)
    finally:
        if material.cache_root is not None and settings.cache_dir is None:
            shutil.rmtree(material.cache_root, ignore_errors=True)
    recovery = recovery_entry(teacher, record, settings, material, outcome, device)
    if record.recovery is not None:
        recovery["previous"] = record.recovery
    healed = dataclasses.replace(record, recovery=recovery, verify=None)  # the pruned weights' check is not these
    teacher_path = Path(teacher).expanduser()
    write_healed(healed, outcome, pruned_dir, out_dir, settings, overwrite,
                 [pruned_dir, teacher_path if teacher_path.exists() else None], command, started)
    return healed

