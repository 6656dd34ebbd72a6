"""Output folders that never cost a user a file.

Every folder ``compressor`` writes holds a marker, ``.compressor``, listing the files it wrote. ``--overwrite``
replaces a folder only when everything in it is listed there (or, for folders written before the marker existed,
has a name ``compressor`` writes). An output is built in a staging folder beside ``--out`` and swapped in at the
end: the old folder is renamed aside, the new one renamed in, and only then is the old one deleted, so a failure or
an interrupt at any moment leaves either the previous output or the new one, never a mix. Staging folders left by
a run that was killed (its process gone) are removed by the next run into the same place.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import CompressorError

MARKER = ".compressor"
STAGING = ".partial-"
"""Infix of a staging folder's name: ``.<out name>.partial-<random>`` beside ``--out``."""
ASIDE = ".old-"
"""Infix of a previous output renamed aside while the new one is renamed in."""
LEGACY_NAMES = (
    "config.json", "generation_config.json", "compression.json", "README.md", "model.safetensors",
    "model-*-of-*.safetensors", "model.safetensors.index.json", "modeling_*.py", "gated_delta.py",
    "gated_deltanet.py", "fla_layers.py", "delta_rule.py", "gla.py", "kda.py", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "stats.safetensors", "report.json",
    "report.md", "figures", "final_rank_heatmap.png", "rank_over_time.png", "final_rank_histogram.png",
)
"""What the versions before the marker wrote: a folder without a marker that holds ``compression.json`` or
``stats.safetensors`` and nothing else but these names is taken for one of their outputs."""
HUB_CACHE = ".cache"
"""huggingface_hub's ``upload_large_folder`` keeps its resumption state here, inside the pushed folder."""


def check_output_folder(out_dir: Path, overwrite: bool, sources: Iterable[Path | None] = ()) -> None:
    """Refuse, before anything runs, an output folder that would cost the user a file.

    Refused with or without ``overwrite``: the current folder or one of its parents, a folder that is, holds or lies
    inside one of ``sources`` (the source model's folder), a path that is a file. An existing non-empty folder is
    refused without ``overwrite``, and with it unless ``compressor`` wrote everything in it.
    """
    out = out_dir.expanduser().resolve()
    here = Path.cwd().resolve()
    if out == here or out in here.parents:
        raise CompressorError(
            f"--out {out_dir} is the current folder or one of its parents; name a new folder for the output."
        )
    for source in sources:
        if source is None:
            continue
        source = source.expanduser().resolve()
        if out == source or out in source.parents or source in out.parents:
            raise CompressorError(
                f"--out {out_dir} overlaps the source model's folder {source}; name a folder outside it."
            )
    if out.exists() and not out.is_dir():
        raise CompressorError(f"output path {out_dir} exists and is not a folder.")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise CompressorError(f"output folder {out_dir} already exists; pass --overwrite to replace it.")
    foreign = foreign_entries(out)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise CompressorError(
            f"--overwrite only replaces folders that compressor wrote, and {out_dir} holds {shown}, which it did not "
            "write; choose another --out."
        )


def foreign_entries(folder: Path) -> list[str]:
    """Names in ``folder`` that ``compressor`` did not write there (all of them for a folder it never wrote)."""
    names = sorted(entry.name for entry in folder.iterdir())
    marker = _read_marker(folder)
    if marker is not None:
        ours = {MARKER, *marker.get("files", [])}
        return [name for name in names if name not in ours and not _hub_cache(folder / name)]
    if not {"compression.json", "stats.safetensors"} & set(names):
        return names
    return [name for name in names
            if not any(fnmatch.fnmatchcase(name, pattern) for pattern in LEGACY_NAMES) and not _hub_cache(folder / name)]


def _hub_cache(path: Path) -> bool:
    return path.name == HUB_CACHE and path.is_dir() and {p.name for p in path.iterdir()} <= {"huggingface"}


def _read_marker(folder: Path) -> dict | None:
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _write_marker(folder: Path, kind: str, files: list[str]) -> None:
    marker = {"written_by": "compressor", "kind": kind, "pid": os.getpid(), "files": files}
    (folder / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")


def check_writable(out_dir: Path) -> None:
    """Create and remove a staging folder beside ``out_dir``: a folder that cannot be written fails now, in one
    sentence, not after calibration. Creates ``out_dir``'s missing parents."""
    parent = out_dir.expanduser().resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{STAGING}", dir=parent)).rmdir()
    except OSError as error:
        raise CompressorError(f"cannot write the output beside {out_dir}: {error.strerror or error}.") from None


def check_free_space(out_dir: Path, needed: int) -> None:
    """Refuse to start writing ``needed`` bytes where the disk has less free."""
    free = shutil.disk_usage(out_dir.expanduser().resolve().parent).free
    if free < needed:
        raise CompressorError(
            f"the output needs about {needed / 2**30:.2f} GiB but the disk of {out_dir} has {free / 2**30:.2f} GiB "
            "free; free some space or choose another --out."
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(out_dir: Path) -> list[Path]:
    """Remove the staging folders of runs into ``out_dir`` whose process is gone (killed before it could clean
    up), and put back a previous output that such a run had renamed aside; returns what was removed."""
    out = out_dir.expanduser().resolve()
    removed = []
    if not out.parent.is_dir():
        return removed
    for entry in sorted(out.parent.glob(f".{out.name}.*")):
        marker = _read_marker(entry)
        ours = entry.is_dir() and marker is not None and marker.get("written_by") == "compressor"
        if not ours or _alive(int(marker.get("pid", 0))):
            continue
        if entry.name.startswith(f".{out.name}{ASIDE}") and not out.exists():
            entry.rename(out)  # the run died between renaming the old output aside and the new one in
        elif entry.name.startswith((f".{out.name}{STAGING}", f".{out.name}{ASIDE}")):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextmanager
def staging_folder(out_dir: Path, overwrite: bool, kind: str = "prune",
                   sources: Iterable[Path | None] = ()) -> Iterator[Path]:
    """Yield a staging folder beside ``out_dir``; on success it replaces ``out_dir``, on any failure or interrupt
    it vanishes and ``out_dir`` is as it was. ``kind`` (``prune``, ``analyze``, ``heal``) goes into the marker."""
    sources = list(sources)
    check_output_folder(out_dir, overwrite, sources)
    for stale in remove_stale_staging(out_dir):
        print(f"removed {stale}, left by an interrupted run", file=sys.stderr)
    out = out_dir.expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}{STAGING}", dir=out.parent))
    try:
        _write_marker(staging, kind, [])
        yield staging
        _write_marker(staging, kind, sorted(entry.name for entry in staging.iterdir() if entry.name != MARKER))
        _default_permissions(staging)
        check_output_folder(out_dir, overwrite, sources)  # nothing foreign appeared there meanwhile
        _swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_in(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``; an existing ``out`` is renamed aside first and deleted only afterwards."""
    if not out.exists():
        staging.rename(out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}{ASIDE}", dir=out.parent))
    out.rename(aside)  # replaces the empty folder mkdtemp made
    try:
        staging.rename(out)
    except BaseException:
        aside.rename(out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _default_permissions(folder: Path) -> None:
    """Temporary folders and files are private (0700/0600); give the result the user's usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
