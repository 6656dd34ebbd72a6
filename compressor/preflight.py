"""What ``prune`` refuses before a model loads, with light imports only: the command line runs it before it imports
the pipeline (fla, every family's modeling code), so that a mistake is refused in a second or two."""

from __future__ import annotations

from pathlib import Path

from .errors import CompressorError
from .outputs import check_output
from .settings import PruneSettings


def check_prune_inputs(source: Path | None, out_dir: Path | None, settings: PruneSettings):
    """Check the options, ``out_dir`` (free or an earlier output, not the source, writable) and that streaming has a
    local folder to read; ``source``: the model's local folder, None for a Hub id. Returns the options' budget."""
    budget = settings.check(out_dir)
    if out_dir is not None and not settings.dry_run:
        check_output(out_dir, settings.overwrite, [source])
        if settings.export == "stream" and source is None:
            raise CompressorError("--export stream reads the source's safetensors files and needs a local model "
                                  "folder; download the model first or use --export memory.")
    return budget
