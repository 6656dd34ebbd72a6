"""Launch configurations of fla's kernels recorded on known GPUs, so that a first run on a machine whose Triton
cache is empty compiles one configuration per kernel instead of autotuning every candidate.

fla reads such configurations itself (``fla.ops.utils.cache``: ``FLA_CACHE_MODE``, ``FLA_CONFIG_DIR``, one
``{kernel}.json`` per kernel, entries keyed by Triton's autotuning key). ``compressor/data/fla_configs/{GPU}/``
holds the configurations autotuning chose on that GPU (fla's sanitised device name, e.g. ``NVIDIA_H200``) during a
``compress prune``, written by ``scripts/record_fla_configs.py``. On other GPUs, or where the user set either
variable, fla autotunes as it always does.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

RECORDED = Path(__file__).parent / "data" / "fla_configs"
"""One folder per GPU name, in fla's config-file format."""


def recorded_folder() -> Path | None:
    """The recorded configurations for this process's CUDA GPU, or None (no CUDA, no fla, no folder for it)."""
    if not torch.cuda.is_available():
        return None
    try:
        from fla.ops.utils.cache import get_gpu_info
    except Exception:  # fla absent, or a version without config files
        return None
    folder = RECORDED / get_gpu_info()
    return folder if folder.is_dir() else None


@contextlib.contextmanager
def recorded_fla_configs(folder: Path | None = None) -> Iterator[bool]:
    """Within the block (or the decorated call), fla's autotuned kernels take the configurations in ``folder``
    (default: :func:`recorded_folder`) for every call whose autotuning key matches a recorded one, numbers aside
    (fla's ``fuzzy`` mode); other calls autotune. Yields whether configurations are in use. Does nothing where
    ``FLA_CACHE_MODE`` or ``FLA_CONFIG_DIR`` is set: the user's choice stands. Configurations a kernel took in the
    block stay with it for the rest of the process, as an autotuned one would."""
    folder = folder or recorded_folder()
    if folder is None or "FLA_CACHE_MODE" in os.environ or "FLA_CONFIG_DIR" in os.environ:
        yield False
        return
    from fla.ops.utils import cache

    mode = cache.FLA_CACHE_MODE
    cache.FLA_CACHE_MODE = cache.FlaCacheMode.FUZZY
    os.environ["FLA_CONFIG_DIR"] = str(folder)
    try:
        yield True
    finally:
        cache.FLA_CACHE_MODE = mode
        os.environ.pop("FLA_CONFIG_DIR", None)
