"""The student's training: which parameters train (LoRA or full), the schedule, the AdamW loop."""

from __future__ import annotations

import math
from collections.abc import Iterator

from ..errors import CompressorError
from ..recurrences import torch_recurrences
from .losses import distillation_loss
from .settings import HealSettings


def group_prefixes(model, family, group: str) -> list[str]:
    """Module-name prefixes of the trained group: the linear-attention mixers, or the whole model ('')."""
    if group == "all":
        return [""]
    from ..layers import linear_layers

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


def round_to(model, dtype) -> None:
    """Round the floating-point parameters to ``dtype`` and back to their own dtype (what writing them does)."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            parameter.data = parameter.data.to(dtype).to(parameter.dtype)
