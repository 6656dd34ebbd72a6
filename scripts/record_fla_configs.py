"""Record the launch configurations fla's autotuning chooses on this GPU during a ``compress prune``, as fla config
files that ``compressor.tuned_kernels`` hands to fla on GPUs of the same name.

    python scripts/record_fla_configs.py [--out DIR] -- prune MODEL --out PRUNED [prune options]

Runs the ``compress`` command after ``--`` in this process with fla's config files off (every kernel autotunes),
then writes one ``{kernel}.json`` per autotuned fla kernel into ``--out`` (default:
``compressor/data/fla_configs/{GPU}``), merged with the entries already there. Run it with an empty Triton cache
(``TRITON_CACHE_DIR`` set to a new folder), so that every configuration is chosen on this machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

os.environ["FLA_CACHE_MODE"] = "disabled"  # before fla is imported: every kernel autotunes


def chosen_configs() -> dict[str, dict[str, dict]]:
    """Kernel name -> fla config-file entries (keyed by the hash of Triton's autotuning key) of every fla autotuner
    that chose a configuration in this process."""
    from fla.ops.utils.cache import AutotuneKey, CachedAutotuner

    kernels: dict[str, dict[str, dict]] = {}
    for tuner in (obj for obj in gc.get_objects() if isinstance(obj, CachedAutotuner) and obj.cache):
        entries = kernels.setdefault(tuner.kernel_name, {})
        for key, config in tuner.cache.items():
            entries[AutotuneKey.key_hash(key)] = {
                "autotune_key": AutotuneKey.normalize_autotune_key(key),
                "config": {"kwargs": dict(config.kwargs), "num_warps": config.num_warps,
                           "num_stages": config.num_stages, "num_ctas": config.num_ctas, "maxnreg": config.maxnreg},
            }
    return kernels


def write(kernels: dict[str, dict[str, dict]], folder: Path) -> None:
    """Merge ``kernels`` into ``folder``'s config files (new entries replace recorded ones of the same key)."""
    import triton

    folder.mkdir(parents=True, exist_ok=True)
    for name, entries in sorted(kernels.items()):
        path = folder / f"{name}.json"
        recorded = json.loads(path.read_text())["autotune_entries"] if path.exists() else {}
        content = {"kernel_name": name, "triton_version": triton.__version__,
                   "autotune_entries": {**recorded, **entries}}
        path.write_text(json.dumps(content, indent=1) + "\n")
        print(f"{path}: {len(entries)} configurations recorded", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="the config folder [default: compressor's, for this GPU]")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- and a compress command")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give a compress command after --, e.g. -- prune MODEL --out DIR")
    from fla.ops.utils.cache import get_gpu_info

    from compressor.cli import main as compress
    from compressor.tuned_kernels import RECORDED

    compress.main(command, prog_name="compress", standalone_mode=False)
    write(chosen_configs(), args.out or RECORDED / get_gpu_info())


if __name__ == "__main__":
    main()
