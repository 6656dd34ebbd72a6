"""Training text for healing: windows of the calibration text, or samples from the teacher, in batches."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

from ..errors import CompressorError
from .settings import HealSettings


def training_windows(settings: HealSettings, tokenizer):
    """(windows [N, seq_len] of the calibration text, every whole one in order, description)."""
    from ..calibration_text import read_documents, token_windows

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
