"""Launch configurations of fla's kernels recorded on known GPUs, so that a first run on a machine whose Triton
cache is empty compiles one configuration for each recorded kernel instead of autotuning every candidate.

fla reads such configurations itself (``fla.ops.utils.cache``: ``FLA_CACHE_MODE``, ``FLA_CONFIG_DIR``, one
``{kernel}.json`` per kernel, entries keyed by Triton's autotuning key). ``compressor/data/fla_configs/{GPU}/``
holds the configurations autotuning chose on that GPU (fla's sanitised name of CUDA device 0, e.g.
``NVIDIA_H200``) during a ``compress prune`` (on the H200, those of the shipped prefill's batch layout are copied
from its packed call's: docs/internals.md), written by ``scripts/record_fla_configs.py``; each file also names
the fla version and the module of its kernel. A folder is used only under the fla version it was recorded with
and only if every configuration in it is still one of its kernel's autotuning candidates (fla drops candidates
that miscompile). Only kernels that fla autotunes through its config files can take one; the others autotune.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import sys
import threading
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import torch

RECORDED = Path(__file__).parent / "data" / "fla_configs"
"""One folder per GPU name, in fla's config-file format."""

_switch = threading.Lock()


def recorded_folder() -> Path | None:
    """The recorded configurations for this process's CUDA GPU, or None (no CUDA, no fla, no folder for it, or one
    that does not fit the installed fla: :func:`fits_installed_fla`)."""
    if not torch.cuda.is_available():
        return None
    try:
        from fla.ops.utils.cache import get_gpu_info
    except Exception:  # fla absent, or a version without config files
        return None
    folder = RECORDED / get_gpu_info()
    return folder if folder.is_dir() and fits_installed_fla(folder) else None


def installed_fla_version() -> str:
    """The version of ``fla-core``, the distribution that holds fla's kernels (``fla.ops``)."""
    return metadata.version("fla-core")


@functools.lru_cache(maxsize=None)
def fits_installed_fla(folder: Path) -> bool:
    """Whether every file of ``folder`` was recorded under the installed fla version and names a kernel of fla's
    config-file autotuner whose current candidates include each of its configurations (False for a file that
    cannot be read as one, or fla's kernels without a version to compare)."""
    try:
        installed = installed_fla_version()
        for path in sorted(folder.glob("*.json")):
            content = json.loads(path.read_text())
            tuner = config_file_autotuner(getattr(importlib.import_module(content["module"]), content["kernel_name"]))
            if content.get("fla_version") != installed or tuner is None:
                return False
            candidates = [candidate_of(as_recorded(config)) for config in tuner.configs]
            if any(candidate_of(entry["config"]) not in candidates for entry in content["autotune_entries"].values()):
                return False
    except (OSError, ValueError, LookupError, TypeError, AttributeError, ImportError):  # unreadable: autotune
        return False
    return True


def config_file_autotuner(kernel):
    """fla's config-file autotuner (``CachedAutotuner``) of ``kernel`` (a module's kernel object, through any
    ``triton.heuristics`` around it), or None where fla autotunes it otherwise or not at all."""
    from fla.ops.utils.cache import CachedAutotuner

    while kernel is not None and not isinstance(kernel, CachedAutotuner):
        kernel = getattr(kernel, "fn", None)
    return kernel


def as_recorded(config) -> dict:
    """A Triton ``Config`` in fla's config-file form."""
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages,
            "num_ctas": config.num_ctas, "maxnreg": config.maxnreg}


def candidate_of(config: dict) -> tuple:
    """A recorded configuration as comparable values: the tuned arguments, warps, stages and CTAs."""
    return (sorted(config["kwargs"].items()), config["num_warps"], config["num_stages"], config["num_ctas"])


@contextlib.contextmanager
def recorded_fla_configs(folder: Path | None = None) -> Iterator[bool]:
    """Within the block (or the decorated call), fla's config-file kernels take the configurations in ``folder``
    (default: :func:`recorded_folder`) for every call whose autotuning key matches a recorded one, numbers aside
    (fla's ``fuzzy`` mode); other calls autotune. Yields whether configurations are in use.

    Does nothing where fla's mode is not its default (``disabled``) or ``FLA_CACHE_MODE`` or ``FLA_CONFIG_DIR``
    is set: the user's choice, or an enclosing block, stands. The switch is made and undone under a lock; while a
    block runs, fla calls of every thread read the recorded configurations. A configuration a kernel took in the
    block stays with it for the rest of the process, as an autotuned one would."""
    folder = folder or recorded_folder()
    if folder is None:
        yield False
        return
    from fla.ops.utils import cache

    with _switch:
        switched = (cache.FLA_CACHE_MODE is cache.FlaCacheMode.DISABLED
                    and "FLA_CACHE_MODE" not in os.environ and "FLA_CONFIG_DIR" not in os.environ)
        if switched:
            cache.FLA_CACHE_MODE = cache.FlaCacheMode.FUZZY
            os.environ["FLA_CONFIG_DIR"] = str(folder)
    try:
        yield switched
    finally:
        if switched:
            with _switch:
                cache.FLA_CACHE_MODE = cache.FlaCacheMode.DISABLED
                os.environ.pop("FLA_CONFIG_DIR", None)


def autotuned_fla_configs() -> dict[str, dict]:
    """The configurations fla's config-file kernels hold in this process, in fla's config-file form: kernel name ->
    {"module": its fla module, "autotune_entries": {key hash: {"autotune_key": [...], "config": {...}}}}, one entry
    for every autotuning key met so far (autotuned here, read from the Triton cache where fla caches its choices, or
    taken from a config file). Empty without fla, or before any of its kernels ran."""
    try:
        from fla.ops.utils.cache import AutotuneKey
    except Exception:  # fla absent, or a version without config files
        return {}
    kernels: dict[str, dict] = {}
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] != "fla" or module is None:
            continue
        for value in list(vars(module).values()):
            tuner = config_file_autotuner(value) if hasattr(value, "fn") else None
            if tuner is None or tuner.fn.__module__ != name or not tuner.cache:
                continue
            entries = kernels.setdefault(tuner.kernel_name, {"module": name, "autotune_entries": {}})
            for key, config in tuner.cache.items():
                entries["autotune_entries"][AutotuneKey.key_hash(key)] = {
                    "autotune_key": AutotuneKey.normalize_autotune_key(key), "config": as_recorded(config)}
    return kernels
