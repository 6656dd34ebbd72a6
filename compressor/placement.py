"""Spread a model's decoder layers over several devices with accelerate's device maps (``--device-map``), for
calibration and evaluation alike: each decoder layer whole on one device, activations moved between devices by
accelerate's hooks."""

from __future__ import annotations

import torch
from torch import nn

from .errors import CompressorError

from .settings import DEVICE_MAPS


def max_memory(max_gpu_memory: str | None, max_cpu_memory: str | None, gpus: int) -> dict | None:
    """accelerate's ``max_memory`` ({0: "40GB", …, "cpu": "100GB"}) from the limits, or None for what is free."""
    if max_gpu_memory is None and max_cpu_memory is None:
        return None
    limits: dict = {}
    if max_gpu_memory is not None:
        limits.update({index: max_gpu_memory for index in range(gpus)})
    if max_cpu_memory is not None:
        limits["cpu"] = max_cpu_memory
    return limits


def device_map(model: nn.Module, strategy: str, limits: dict | None, dtype: torch.dtype) -> dict[str, int | str]:
    """Module name -> device for ``model`` (on the meta device: shapes only), decoder layers never split: ``auto``
    and ``balanced`` spread them evenly over the GPUs (accelerate's ``get_balanced_memory``), ``sequential`` fills
    each GPU before the next. A map that offloads modules (to the CPU beside GPUs, or to disk) is refused:
    accelerate's offload hooks load a module's weights when it is called, and the mixers read their convolution's
    weight without calling it; a model that large runs one layer at a time (``--max-gpu-memory``)."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if strategy not in DEVICE_MAPS:
        raise CompressorError(f"--device-map must be one of {', '.join(DEVICE_MAPS)}, got '{strategy}'.")
    no_split = sorted({type(layer).__name__ for layer in model.model.layers})
    model.tie_weights()
    if strategy in ("auto", "balanced"):
        limits = get_balanced_memory(model, max_memory=limits, no_split_module_classes=no_split, dtype=dtype)
    placed = infer_auto_device_map(model, max_memory=limits, no_split_module_classes=no_split, dtype=dtype)
    if "disk" in placed.values() or ("cpu" in placed.values() and torch.cuda.device_count() > 0):
        raise CompressorError("the model does not fit on the GPUs allowed (accelerate would offload layers, whose "
                              "hooks miss the mixers' convolution weights); calibrate it one layer at a time with "
                              "--max-gpu-memory instead of --device-map.")
    return placed


def spans_devices(model: nn.Module) -> bool:
    """Whether a device map spreads ``model`` over more than one device."""
    return len(set(getattr(model, "hf_device_map", {}).values())) > 1
