"""Every option of the commands as typed settings, checked in one place before a model loads.

This module imports nothing heavy (no torch, no transformers), so that ``compress --help`` stays fast; the checks
that need the budget parser import it when they run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CompressorError

SCORE_METHODS = ("joint", "rank", "stable_rank", "entropy_rank", "norm", "frobenius", "random")
"""Scores computed from the state statistics (``compressor.scoring``)."""
PRUNE_METHODS = ("auto", *SCORE_METHODS, "loss")
"""``--method`` choices: the statistics scores, the measured loss of masking each head, and ``auto``."""
KEY_METHODS = ("auto", "rrqr", "l1", "wanda", "taylor", "random")
"""How ``--key-reduction`` chooses each key head's query/key channels (``compressor.key_channels``)."""
ACTIVATION_KEY_METHODS = ("rrqr", "wanda", "taylor")
"""The ``KEY_METHODS`` that read activations (or gradients) on the calibration windows."""
REMOVE = ("high", "low")
DEFAULT_REMOVE = "low"
"""The end of a score removed when ``--remove`` is not given: on every trained model measured, removing low scores
beats removing high ones (the paper's rule, ``--method joint --remove high``)."""
BUDGETS = ("global", "uniform")
LAYOUTS = ("free", "stock")
"""``free``: any heads per layer (per-layer config, shipped code); ``stock``: the same heads in every layer, in the
stock grouping (a stock config that stock transformers and inference engines load)."""
DEFAULT_STATE_REDUCTION = 0.389
PACKINGS = ("pack", "truncate")
STEP_CHOICES = ("every", "log")
CHUNK = 64
"""Tokens per chunk of the chunked recurrences: states exist at multiples of it (and after the last token)."""
DEVICE_MAPS = ("auto", "balanced", "sequential")
"""accelerate's strategies for ``--device-map`` (``compressor.placement``)."""
EXPORTS = ("memory", "stream")
"""``memory``: ``save_pretrained`` of the pruned model; ``stream``: shard by shard from the source's safetensors
files, without the model (``compressor.streaming``)."""
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
LOSS_WINDOWS = 2
LOSS_SEQ_LEN = 256


def at_least(option: str, value: int | None, least: int) -> None:
    """One sentence when an integer option is below ``least`` (None passes: it means a default)."""
    if value is not None and value < least:
        raise CompressorError(f"{option} must be at least {least}, got {value}.")


def choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise CompressorError(f"{option} must be one of {', '.join(choices)}, got '{value}'.")


@dataclass
class CalibrationSettings:
    """Where calibration text comes from and how it is cut into windows and measured."""

    calib: str | None = None
    """A file, a folder, a ``.jsonl`` file, ``hf:ID[:CONFIG]``, ``text:LITERAL``, or None (the embedded text)."""
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
    every: int = CHUNK
    """Tokens between measured state boundaries (a multiple of 64)."""
    steps: str = "every"
    """``every``: a boundary every ``every`` tokens; ``log``: at 64, 128, 256, … tokens (and the last token)."""

    def check(self) -> None:
        for name in ("samples", "seq_len", "batch_size"):
            at_least(f"--{name.replace('_', '-')}", getattr(self, name), 1)
        choice("--packing", self.packing, PACKINGS)
        self.times()
        if not self.eps > 0:
            raise CompressorError(f"--eps must be positive, got {self.eps}.")

    def times(self) -> list[int]:
        """Token counts at which states are measured (:func:`measured_steps`)."""
        return measured_steps(self.seq_len, self.every, self.steps)


def measured_steps(seq_len: int, every: int = CHUNK, steps: str = "every") -> list[int]:
    """Token counts at which states are measured: every ``every`` tokens (a multiple of the 64-token chunk), or
    log-spaced (64, 128, 256, …) with ``steps='log'``; the last token (``seq_len``) is always included."""
    choice("--steps", steps, STEP_CHOICES)
    if every < CHUNK or every % CHUNK:
        raise CompressorError(f"--every must be a positive multiple of {CHUNK} tokens, got {every}.")
    if steps == "log":
        times = [CHUNK << i for i in range(max(seq_len // CHUNK, 1).bit_length()) if CHUNK << i < seq_len]
    else:
        times = list(range(every, seq_len, every))
    return [*times, seq_len]


def held_out_count(samples: int, holdout: float, option: str = "--method auto") -> int:
    """How many of ``samples`` windows ``auto`` holds out: ceil(holdout · samples), leaving at least one to score
    (``option``: the option the error names)."""
    if not 0.0 < holdout < 1.0:
        raise CompressorError(f"--auto-holdout must lie strictly between 0 and 1, got {holdout}.")
    held = math.ceil(holdout * samples)
    if held >= samples:
        raise CompressorError(
            f"{option} needs calibration windows both to score and to hold out, but {samples} window(s) with "
            f"--auto-holdout {holdout} leave none to score; raise --samples."
        )
    return held


@dataclass
class EvalSettings:
    """Held-out perplexity and copy recall: ``path`` None is the embedded held-out text."""

    path: Path | None = None
    samples: int | None = None
    """Windows measured; None: every whole window of the text, in order."""
    seq_len: int = 1024
    batch_size: int = 4

    def check(self, prefix: str = "--") -> None:
        """``prefix`` names the options as the command spells them (``--eval-`` for prune's)."""
        if self.path is not None and not Path(self.path).is_file():
            raise CompressorError(f"evaluation file {self.path} does not exist.")
        if self.path is not None and not Path(self.path).read_bytes().strip():
            raise CompressorError(f"evaluation file {self.path} is empty.")
        at_least(f"{prefix}samples", self.samples, 1)
        at_least(f"{prefix}seq-len", self.seq_len, 2)
        at_least("--batch-size", self.batch_size, 1)


@dataclass
class PruneSettings:
    """Everything ``compress prune`` is told, but the model and the output folder."""

    state_reduction: float | None = None
    """Share of the recurrent state to remove (None: 0.389, unless ``heads_per_layer`` is given)."""
    budget: str = "global"
    heads_per_layer: str | dict[int, int] | None = None
    protect_layers: str | tuple[int, ...] = ()
    min_heads_per_layer: int = 1
    layout: str = "free"
    method: str = "auto"
    alpha: float = 0.5
    remove: str | None = None
    """``high`` or ``low``; None: ``low`` for a score, and ``auto`` measures both."""
    key_reduction: float | str | None = None
    """Share of every key head's query/key channels to remove (None: none; ``auto``: heads alone, channels alone or
    half of the state budget each, whichever loses least on held-out windows)."""
    key_method: str = "auto"
    loss_samples: int = LOSS_WINDOWS
    loss_seq_len: int = LOSS_SEQ_LEN
    loss_batch_size: int = 16
    auto_holdout: float = 0.25
    stats: Path | None = None
    """A folder written by ``compress analyze --out``: its statistics instead of calibrating."""
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    evaluation: EvalSettings | None = None
    """Perplexity and copy recall before and after, or None for neither."""
    device: str = "auto"
    dtype: str = "auto"
    dry_run: bool = False
    verify: bool = True
    overwrite: bool = False
    max_shard_size: str = "2GB"
    export: str = "memory"
    max_gpu_memory: str | None = None
    """With ``max_cpu_memory``: the most the compute device may hold; a model larger than that is calibrated one
    decoder layer at a time from its files (``compressor.sequential``) and exported shard by shard."""
    max_cpu_memory: str | None = None
    device_map: str | None = None
    """``auto``, ``balanced`` or ``sequential``: decoder layers spread over the GPUs by accelerate (within
    ``max_gpu_memory`` each), instead of the whole model on ``device``."""
    base_model: str | None = None
    """The Hub id the card names as ``base_model`` (None: the source when it is a Hub id or a Hub cache path)."""
    push_to_hub: str | None = None
    private: bool = False

    @property
    def removes_heads(self) -> bool:
        """Whether heads are removed: always without ``key_reduction``; with it, when a head budget is given."""
        return self.key_reduction is None or self.state_reduction is not None or self.heads_per_layer is not None

    @property
    def scores_heads(self) -> bool:
        """Whether heads are scored by ``method``: where heads are removed, and by ``--key-reduction auto``, which
        tries removing them."""
        return self.removes_heads or self.key_reduction == "auto"

    @property
    def asked_state_reduction(self) -> float | None:
        """The share of the recurrent state the options ask to remove (None: heads per layer given, or a share of
        channels alone)."""
        if self.heads_per_layer is not None or not self.scores_heads:
            return None
        return DEFAULT_STATE_REDUCTION if self.state_reduction is None else self.state_reduction

    @property
    def reads_calibration_text(self) -> bool:
        """Whether the calibration text is read: always without ``stats``; with them, by the loss scorer or ``auto``
        where heads are scored, and where query/key channels are chosen from activations or gradients."""
        if self.stats is None:
            return True
        heads_by_loss = self.scores_heads and self.method not in SCORE_METHODS
        channels_by_activations = self.key_reduction is not None and self.key_method in ("auto",
                                                                                         *ACTIVATION_KEY_METHODS)
        return heads_by_loss or channels_by_activations

    @property
    def end(self) -> str:
        """The end of the scores removed (``auto`` measures both and records its choice)."""
        return self.remove or DEFAULT_REMOVE

    def check(self, out_dir: Path | None):
        """Check every option on its own (before a model loads) and return the budget they make."""
        from .budgets import make_budget

        self.calibration.check()
        choice("--method", self.method, PRUNE_METHODS)
        if self.remove is not None:
            choice("--remove", self.remove, REMOVE)
        if not 0.0 <= self.alpha <= 1.0:
            raise CompressorError(f"--alpha must lie in [0, 1], got {self.alpha}.")
        if self.method == "auto" and self.scores_heads:
            self._check_auto()
        choice("--layout", self.layout, LAYOUTS)
        self._check_key_reduction()
        budget = make_budget(self.budget, self.state_reduction, self.heads_per_layer, self.protect_layers,
                             self.min_heads_per_layer, self.layout)
        at_least("--loss-samples", self.loss_samples, 1)
        at_least("--loss-seq-len", self.loss_seq_len, 2)
        at_least("--loss-batch-size", self.loss_batch_size, 1)
        if self.evaluation is not None:
            self.evaluation.check("--eval-")
        choice("--dtype", self.dtype, DTYPE_CHOICES)
        check_shard_size(self.max_shard_size)
        choice("--export", self.export, EXPORTS)
        check_memory_sizes(self.max_gpu_memory, self.max_cpu_memory)
        if self.device_map is not None:
            choice("--device-map", self.device_map, DEVICE_MAPS)
        if self.dry_run and self.push_to_hub is not None:
            raise CompressorError("--push-to-hub uploads the written folder, and --dry-run writes none; drop one of them.")
        if not self.verify and self.push_to_hub is not None:
            raise CompressorError("--push-to-hub uploads only a folder whose reload check passed, and --no-verify "
                                  "skips that check; drop --no-verify (or push later with "
                                  "`compress push --unverified`).")
        if not self.dry_run and out_dir is None:
            raise CompressorError("an output folder (--out) is required unless --dry-run is given.")
        return budget

    def _check_key_reduction(self) -> None:
        choice("--key-method", self.key_method, KEY_METHODS)
        if self.key_reduction is None:
            return
        if isinstance(self.key_reduction, str) and self.key_reduction != "auto":
            raise CompressorError(f"--key-reduction takes a share between 0 and 1 or 'auto', got '{self.key_reduction}'.")
        if self.key_reduction == "auto":
            if self.stats is not None:
                raise CompressorError("--key-reduction auto calibrates on its own scoring windows and cannot reuse "
                                      "--stats; give a share of channels to reuse them.")
            held = held_out_count(self.calibration.samples, self.auto_holdout, "--key-reduction auto")
            for nested, option in ((self.method == "auto", "--method auto"), (self.key_method == "auto",
                                                                             "--key-method auto")):
                if nested:  # it holds out part of the windows the splits are chosen on
                    held_out_count(self.calibration.samples - held, self.auto_holdout,
                                   f"--key-reduction auto with {option}")
        elif not 0.0 < self.key_reduction < 1.0:
            raise CompressorError(f"--key-reduction must lie strictly between 0 and 1, got {self.key_reduction}.")
        if self.layout == "stock":
            raise CompressorError("--key-reduction keeps the source's query scale, which stock code cannot read "
                                  "(it scales queries by the new d_k^-0.5); drop --layout stock.")
        if self.heads_per_layer is not None:
            raise CompressorError("--key-reduction combines with --state-reduction only; drop --heads-per-layer.")
        if self.key_method == "auto":
            held_out_count(self.calibration.samples, self.auto_holdout, "--key-method auto")

    def _check_auto(self) -> None:
        if self.remove is not None:
            raise CompressorError("--method auto measures both ends of every score itself; drop --remove, or name "
                                  "a method.")
        if self.stats is not None:
            raise CompressorError("--method auto (the default) calibrates on its own scoring windows and cannot "
                                  "reuse --stats; name a method to reuse them, e.g. --method norm.")
        held_out_count(self.calibration.samples, self.auto_holdout)


def check_memory_sizes(max_gpu_memory: str | None, max_cpu_memory: str | None) -> None:
    """``--max-gpu-memory`` and ``--max-cpu-memory`` look like 20GB or 500MB."""
    from huggingface_hub.serialization._base import parse_size_to_int

    for option, value in (("--max-gpu-memory", max_gpu_memory), ("--max-cpu-memory", max_cpu_memory)):
        try:
            if value is not None:
                parse_size_to_int(value)
        except ValueError:
            raise CompressorError(f"{option} must look like 20GB or 500MB, got '{value}'.") from None


def check_shard_size(max_shard_size: str) -> None:
    """``2GB``, ``500MB``, … as ``save_pretrained`` reads them."""
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        parse_size_to_int(max_shard_size)
    except ValueError:
        raise CompressorError(f"--max-shard-size must look like 2GB or 500MB, got '{max_shard_size}'.") from None
