"""Record the launch configurations fla's autotuning chooses on this GPU during a ``compress prune``, as fla config
files that ``compressor.tuned_kernels`` hands to fla on GPUs of the same name.

    python scripts/record_fla_configs.py [--out DIR] -- prune MODEL --out PRUNED [prune options]

Runs the ``compress`` command after ``--`` in this process with fla's config files off (every kernel autotunes),
then writes one ``{kernel}.json`` per autotuned fla kernel into ``--out`` (default:
``compressor/data/fla_configs/{GPU}``), with its module and the fla and Triton versions, merged with the entries
recorded there under the same fla version. Run it with an empty Triton cache
(``TRITON_CACHE_DIR`` set to a new folder), so that every configuration is chosen on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ["FLA_CACHE_MODE"] = "disabled"  # before fla is imported: every kernel autotunes (and, the variable
# being set, compressor.tuned_kernels leaves fla alone)


def write(kernels: dict[str, dict], folder: Path) -> None:
    """Write ``kernels`` into ``folder``'s config files, keeping the entries already recorded under the same fla
    version (a new entry replaces one of the same key) and dropping those of another."""
    import triton

    from compressor.tuned_kernels import installed_fla_version

    fla_version = installed_fla_version()
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in sorted(kernels.items()):
        path = folder / f"{name}.json"
        recorded = recorded_file(path) if path.exists() else {}
        if path.exists() and recorded.get("kernel_name") != name:
            sys.exit(f"{path} is not a recorded configuration of {name}; choose another --out.")
        kept = recorded.get("autotune_entries", {}) if recorded.get("fla_version") == fla_version else {}
        written = {"kernel_name": name, "module": content["module"], "fla_version": fla_version,
                   "triton_version": triton.__version__,
                   "autotune_entries": {**kept, **content["autotune_entries"]}}
        path.write_text(json.dumps(written, indent=1) + "\n")
        print(f"{path}: {len(content['autotune_entries'])} configurations recorded", file=sys.stderr)


def recorded_file(path: Path) -> dict:
    """The content of a config file, or {} for a file that is not JSON of one."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


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
    from compressor.tuned_kernels import RECORDED, autotuned_fla_configs

    compress.main(command, prog_name="compress", standalone_mode=False)
    write(autotuned_fla_configs(), args.out or RECORDED / get_gpu_info())


if __name__ == "__main__":
    main()
