"""What ``compress heal`` trains, on what, and how long (``HealSettings``), and its option checks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import CompressorError

TRAIN_GROUPS = ("linear", "all")
DATA_SOURCES = ("calib", "teacher")


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
    """Folder for the top-k cache, new or empty, kept after the run (None: a temporary folder beside the output,
    removed at the end)."""
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
        cache = None if self.cache_dir is None else Path(self.cache_dir).expanduser()
        if cache is not None and cache.exists() and not (cache.is_dir() and not any(cache.iterdir())):
            raise CompressorError(f"the top-k cache folder {self.cache_dir} exists and is not an empty folder; give a new or "
                                  "empty folder.")

    @property
    def steps(self) -> int:
        return math.ceil(self.tokens / (self.batch_size * self.seq_len))

    @property
    def method(self) -> str:
        """``lora`` or ``full``."""
        return "lora" if self.lora_rank > 0 else "full"
