"""Output folders that never cost a user a file.

Every folder ``compressor`` writes holds a marker, ``.compressor``, listing the files it wrote with each one's size
and modification time. ``--overwrite`` replaces a folder only when everything in it is listed there, as it was
written (a file saved over one of compressor's is the user's), or, for folders written before the marker existed,
has a name ``compressor`` writes. An output is built in a staging folder beside ``--out`` and swapped in at the
end: the old folder is renamed aside, the new one renamed in, and only then is the old one deleted, so a failure or
an interrupt at any moment leaves either the previous output or the new one, never a mix. Staging folders left by
a run that was killed (its process gone), and what could not be deleted of a replaced output, are removed by the
next run into the same place; a folder without compressor's marker never is.
"""

from __future__ import annotations

import array
import fnmatch
import json
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from .errors import CompressorError
from .interrupts import held
from .output_locks import PLACE, RUN, alive, holding, lock_held, locked, same_run

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
``stats.safetensors`` and nothing else but these names (and PNGs under ``figures/``) is taken for one of their
outputs."""
UPLOAD_STATE = (".cache/huggingface/upload/", ".cache/huggingface/.gitignore")
"""What huggingface_hub's ``upload_large_folder`` writes inside the folder it pushes (after compressor wrote it), by
prefix; its ``download/`` state, beside a downloaded copy of a pushed output, is not compressor's."""
MARKER_HEAD = b'{\n "written_by": "compressor"'
"""How every marker's JSON begins: a ``.compressor.partial-*`` beginning so (or empty) is one a killed run was
writing."""


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
    foreign = foreign_entries(out)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        if _read_marker(out) is None and len(foreign) == len(written_paths(out)):  # a folder compressor never wrote
            raise CompressorError(f"output folder {out_dir} holds {shown}, which compressor did not write, and "
                                  "--overwrite only replaces folders that compressor wrote; choose another --out.")
        raise CompressorError(
            f"output folder {out_dir} holds {shown}, added or changed after compressor wrote it, and --overwrite "
            f"replaces only what compressor wrote; move {'it' if len(foreign) == 1 else 'them'} out or choose another "
            "--out."
        )
    if not overwrite:
        raise CompressorError(f"output folder {out_dir} already exists; pass --overwrite to replace it.")


def foreign_entries(folder: Path) -> list[str]:
    """Paths (relative, every file and link at any depth; ``name/`` for a folder that cannot be listed) in ``folder``
    that ``compressor`` did not write there, or that changed since (another size or modification time than the
    marker's); all of them for a folder it never wrote. A ``.compressor`` that is not compressor's marker is one."""
    paths = written_paths(folder)
    marker = _read_marker(folder)
    if marker is not None:
        ours = set(marker.get("files", []))
        stamps = marker.get("stamps") or {}
        return [path for path in paths if not path.startswith(UPLOAD_STATE)
                and (path not in ours or (path in stamps and stamps[path] != _stamp(folder / path)))]
    paths += [MARKER] if os.path.lexists(folder / MARKER) else []
    if not {"compression.json", "stats.safetensors"} & set(paths):
        return paths
    return [path for path in paths if not _legacy(path)]


def written_paths(folder: Path) -> list[str]:
    """Every file and link below ``folder`` as a relative POSIX path, but the marker; a folder that cannot be listed
    as ``name/`` (what it holds is unknown)."""
    found = []

    def unlisted(error: OSError) -> None:
        found.append(Path(error.filename).relative_to(folder).as_posix() + "/")

    for root, folders, files in os.walk(folder, onerror=unlisted):
        here = Path(root).relative_to(folder)
        links = [name for name in folders if os.path.islink(os.path.join(root, name))]
        found += [(here / name).as_posix() for name in files + links]
    return sorted(path for path in found if path != MARKER)


def _legacy(path: str) -> bool:
    if path.startswith(UPLOAD_STATE):
        return True
    top, _, rest = path.partition("/")
    if rest:
        return top == "figures" and "/" not in rest and rest.endswith(".png")
    return any(fnmatch.fnmatchcase(top, pattern) for pattern in LEGACY_NAMES)


def _read_marker(folder: Path) -> dict | None:
    """``folder``'s marker: a file (not a link) holding a JSON object written by compressor; else None."""
    if (folder / MARKER).is_symlink():
        return None
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("written_by") == "compressor" else None


def _stamp(path: Path) -> list[int]:
    """[size, modification time in ns] of ``path`` itself (a link's own, not its target's)."""
    info = path.lstat()
    return [info.st_size, info.st_mtime_ns]


def _write_marker(folder: Path, kind: str, files: list[str], state: str, stamps: dict | None = None) -> None:
    """``state``: ``staging`` (being written), ``done`` (an output), ``aside`` (an output being replaced) or
    ``leftover`` (what could not be deleted of a replaced output); ``pid`` and ``run`` the process and run that wrote
    this state, ``place`` where that pid names it, and ``locked`` whether it holds ``folder`` locked meanwhile, so
    that a later run knows a leftover from a live run's folder (``output_locks``); ``stamps`` each file's
    :func:`_stamp` as written."""
    marker = {"written_by": "compressor", "kind": kind, "state": state, "pid": os.getpid(), "run": RUN,
              "files": files}
    if PLACE is not None:
        marker["place"] = PLACE
    if holding(folder):
        marker["locked"] = True
    if stamps:
        marker["stamps"] = stamps
    _replace_marker(folder / MARKER, (json.dumps(marker, indent=1) + "\n").encode())


def _replace_marker(marker: Path, content: bytes, like: os.stat_result | None = None) -> None:
    """Write ``content`` to a new file beside ``marker`` (``.compressor.partial-<random>``, created here, never
    through a link) and rename it over ``marker``: a write that fails part-way leaves the marker as it was. ``like``:
    the stat of a marker this one restores, whose mode, times and (where this process may set them) owner and group
    the new file takes through its own descriptor before the rename."""
    partial = _unused_name(marker.parent, f"{MARKER}.partial-")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(content)
            file.flush()
            if like is not None:
                now = os.fstat(descriptor)
                if (like.st_uid, like.st_gid) != (now.st_uid, now.st_gid):
                    with suppress(OSError):  # not this user's to give (EPERM; EINVAL for an unmapped id)
                        os.fchown(descriptor, like.st_uid, like.st_gid)
                os.fchmod(descriptor, stat.S_IMODE(like.st_mode))
                os.utime(descriptor, ns=(like.st_atime_ns, like.st_mtime_ns))
        os.replace(partial, marker)
    finally:
        partial.unlink(missing_ok=True)


def check_output(out_dir: Path, overwrite: bool, sources: Iterable[Path | None] = (), dry_run: bool = False
                 ) -> None:
    """Everything about ``out_dir`` that can fail, checked before a model loads: stale staging folders of an
    interrupted run removed, the folder free (or an earlier output with ``overwrite``) and none of ``sources`` (the
    inputs' local folders; those that do not exist are skipped), and writable. A ``dry_run`` changes nothing: it
    clears nothing and asks the system whether the folder is writable instead of trying (:func:`check_writable`)."""
    if not dry_run:
        clear_stale_staging(out_dir)
    check_output_folder(out_dir, overwrite, [source if source is not None and source.exists() else None
                                             for source in sources])
    check_writable(out_dir, probe=not dry_run)


def check_writable(out_dir: Path, probe: bool = True) -> None:
    """Create and remove a staging folder in the nearest existing folder on the way to ``out_dir`` (without
    ``probe``: only ask ``os.access``, which changes nothing, not even that folder's modification time): a place that
    cannot be written fails now, in one sentence, not after calibration (creates nothing that stays); then
    :func:`check_replaceable` for an earlier output there."""
    parent = existing_parent(out_dir)
    if parent.is_dir() and _unchangeable(parent):  # an append-only one takes the probe but cannot give it back
        raise CompressorError(f"cannot write the output beside {out_dir}: {parent} is immutable or append-only; "
                              "choose another --out.")
    try:
        if not parent.is_dir():
            raise NotADirectoryError(20, "a file stands where a folder is needed", str(parent))
        if probe:
            Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{STAGING}", dir=parent)).rmdir()
        elif not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", str(parent))
    except OSError as error:
        raise CompressorError(f"cannot write the output beside {out_dir}: {error.strerror or error}.") from None
    if out_dir.expanduser().resolve().is_dir():
        check_replaceable(out_dir)


def check_replaceable(out_dir: Path) -> None:
    """An earlier output in ``out_dir`` is renamed aside at the end, then deleted, and its marker rewritten first:
    refuse now, without writing anything, a mount point (it cannot be renamed) and a folder that cannot change
    (read-only, or with its marker immutable or append-only)."""
    out = out_dir.expanduser().resolve()
    if _mount_point(out):
        raise CompressorError(f"cannot replace {out_dir}: it is a mount point; choose a folder inside it as --out.")
    marker = out / MARKER
    if not os.access(out, os.W_OK | os.X_OK) or _unchangeable(out) or marker.is_file() and _unchangeable(marker):
        raise CompressorError(f"cannot replace {out_dir}: it or its {MARKER} marker is read-only, immutable or "
                              "append-only; make it writable or choose another --out.")
    if _sticky_and_not_ours(out):
        raise CompressorError(f"cannot replace {out_dir}: another user owns it and its folder is sticky (as /tmp is), "
                              "so only they can rename it; choose another --out.")


def _sticky_and_not_ours(path: Path) -> bool:
    """Whether ``path`` cannot be renamed by this process because its parent is sticky (``chmod +t``) and neither
    the parent nor ``path`` is this user's (root may)."""
    if not hasattr(os, "geteuid") or os.geteuid() == 0:
        return False
    user = os.geteuid()
    parent = path.parent.stat()
    return bool(parent.st_mode & stat.S_ISVTX) and user not in (parent.st_uid, path.stat().st_uid)


MOUNT_TABLE = Path("/proc/self/mountinfo")
"""Linux's table of this process's mounts (field 5: the mount point, with space, tab, newline and backslash written
as octal escapes)."""


def _mount_point(path: Path) -> bool:
    """Whether ``path`` is a mount point, bind mounts within one file system included (``MOUNT_TABLE``)."""
    if os.path.ismount(path):
        return True
    try:
        table = MOUNT_TABLE.read_bytes()
    except OSError:
        return False
    fields = [line.split() for line in table.splitlines()]
    unescaped = (re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), f[4]) for f in fields if len(f) > 4)
    return os.fsencode(path) in set(unescaped)


FS_IOC_GETFLAGS, FS_IMMUTABLE_FL, FS_APPEND_FL = 0x80086601, 0x10, 0x20
"""Linux's ioctl that reads a file's attribute flags (``lsattr``), and the flags that forbid renaming or removal."""


def _unchangeable(path: Path) -> bool:
    """Whether Linux marks ``path`` immutable or append-only (``chattr +i``/``+a``: even root cannot then rename it or
    remove what it holds); False where the flags cannot be read."""
    try:
        import fcntl

        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except (ImportError, OSError):
        return False
    flags = array.array("l", [0])
    try:
        fcntl.ioctl(descriptor, FS_IOC_GETFLAGS, flags)
    except OSError:
        return False
    finally:
        os.close(descriptor)
    return bool(flags[0] & (FS_IMMUTABLE_FL | FS_APPEND_FL))


def existing_parent(out_dir: Path) -> Path:
    """The nearest folder (or file) that exists on the way up from ``out_dir``'s parent."""
    parent = out_dir.expanduser().resolve().parent
    while not parent.exists():
        parent = parent.parent
    return parent


def check_free_space(out_dir: Path, needed: int) -> None:
    """Refuse to start writing ``needed`` bytes where the disk has less free."""
    free = shutil.disk_usage(existing_parent(out_dir)).free
    if free < needed:
        raise CompressorError(
            f"the output needs about {needed / 2**30:.2f} GiB but the disk of {out_dir} has {free / 2**30:.2f} GiB "
            "free; free some space or choose another --out."
        )


def remove_stale_staging(out_dir: Path) -> list[Path]:
    """Clear what runs into ``out_dir`` whose process is gone left beside it, by compressor's names and markers only
    (anything else is never touched): staging folders (``staging`` or ``done``, killed before the swap) and what
    could not be deleted of a replaced output (``leftover``) are deleted, as are empty folders of those names (killed
    before their marker). A previous output renamed aside (``aside``) is put back if ``out_dir`` is missing, deleted
    if ``out_dir`` holds the output that replaced it, and otherwise kept and named on stderr. Returns what was
    deleted."""
    out = out_dir.expanduser().resolve()
    removed = []
    if not out.parent.is_dir():
        return removed
    names = re.compile(rf"\.{re.escape(out.name)}(?P<kind>{re.escape(STAGING)}(?:[a-z]+-)*[a-z0-9_]{{8}}"
                       rf"|{re.escape(ASIDE)}[0-9a-f]{{8}})")
    if out.is_dir() and not out.is_symlink() and _read_marker(out) is not None and not lock_held(out):
        _remove_partial_markers(out)  # an output's (a live run may be writing its marker; a user's folder is theirs)
    for entry in sorted(out.parent.iterdir()):
        named = names.fullmatch(entry.name)
        if named is None or not entry.is_dir() or entry.is_symlink():
            continue  # not compressor's
        held = lock_held(entry)
        if held:
            continue  # a live run's
        _remove_partial_markers(entry)
        marker = _read_marker(entry)
        if marker is None:
            with suppress(OSError):
                entry.rmdir()  # only if empty: a run killed before it wrote the marker
            continue
        running = alive(marker, held) if isinstance(marker.get("pid"), int) else True  # _read_marker: ours only
        if running is None:
            print(f"kept {entry}: a run on another machine or in another container wrote it, and whether that run "
                  "still runs cannot be told from here; delete it yourself once it is over", file=sys.stderr)
        if running is not False:
            continue
        state, aside = marker.get("state"), named["kind"].startswith(ASIDE)
        if aside and state == "aside":
            _settle_aside(entry, marker, out, removed)
        elif (state == "leftover" if aside else state in ("staging", "done")) and _delete_marked(entry):
            removed.append(entry)
    return removed


def _remove_partial_markers(folder: Path) -> None:
    """Delete the markers a killed run was writing in ``folder``: files (not links) named ``.compressor.partial-`` and
    eight hex digits, empty or beginning as every marker does (``MARKER_HEAD``)."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        if not re.fullmatch(rf"{re.escape(MARKER)}\.partial-[0-9a-f]{{8}}", entry.name) or entry.is_symlink():
            continue
        with suppress(OSError):
            if entry.is_file() and MARKER_HEAD.startswith(entry.read_bytes()[:len(MARKER_HEAD)]):
                entry.unlink()


def _settle_aside(aside: Path, marker: dict, out: Path, removed: list[Path]) -> None:
    """A previous output a dead run renamed aside (``marker`` its marker): back to ``out`` if that is missing; deleted
    (``removed`` gets it) if ``out`` holds the new output of that run (marked done by the same process); else kept
    and named."""
    if not out.exists():
        with held():  # the run died between renaming the old output aside and the new one in
            aside.rename(out)
            _write_marker(out, marker.get("kind", "prune"), marker.get("files", []), "done", marker.get("stamps"))
        print(f"put back {out}, the output an interrupted run was replacing", file=sys.stderr)
        return
    replaced_by = _read_marker(out) or {}
    if same_run(replaced_by, marker) and replaced_by.get("state") == "done":
        try:
            _write_marker(aside, marker.get("kind", "prune"), [], "leftover")  # never put back once partly gone
        except OSError:
            return
        if _delete_marked(aside):
            removed.append(aside)
        return
    print(f"kept {aside}, the output an interrupted run was replacing in {out}, which now holds another folder; "
          "move one of them or delete it yourself", file=sys.stderr)


def _delete_marked(folder: Path) -> bool:
    """Delete a folder compressor marked, its marker last, so that a folder it cannot wholly delete keeps its marker
    (and a later run tries again); returns whether it is gone."""
    for entry in folder.iterdir():
        if entry.name == MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with suppress(OSError):
                entry.unlink()
    with suppress(OSError):
        if [entry.name for entry in folder.iterdir()] in ([MARKER], []):
            (folder / MARKER).unlink(missing_ok=True)
            folder.rmdir()
    return not folder.exists()


def clear_stale_staging(out_dir: Path) -> None:
    """:func:`remove_stale_staging`, saying on stderr what it removed."""
    for stale in remove_stale_staging(out_dir):
        print(f"removed {stale}, left by an earlier run", file=sys.stderr)


@contextmanager
def scratch_folder(out_dir: Path, kind: str, tag: str | None = None) -> Iterator[Path]:
    """Yield a working folder beside ``out_dir`` (``.<out name>.partial-<tag><random>``, ``tag`` ``<kind>-`` unless
    given, marked as staging), removed when the block ends unless renamed away; one left by a killed run goes at the
    next run into ``out_dir``, as staging folders do."""
    out = out_dir.expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{kind}-" if tag is None else tag
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}{STAGING}{tag}", dir=out.parent))
    with locked(folder):  # a new folder: nothing else holds it
        try:
            _write_marker(folder, kind, [], "staging")
            yield folder
        finally:
            with held():
                if folder.exists():
                    _delete_marked(folder)


@contextmanager
def staging_folder(out_dir: Path, overwrite: bool, kind: str = "prune",
                   sources: Iterable[Path | None] = ()) -> Iterator[Path]:
    """Yield a staging folder beside ``out_dir``; on success it replaces ``out_dir``, on any failure or interrupt
    it vanishes and ``out_dir`` is as it was. ``kind`` (``prune``, ``analyze``, ``heal``) goes into the marker."""
    sources = list(sources)
    clear_stale_staging(out_dir)
    check_output_folder(out_dir, overwrite, sources)
    with scratch_folder(out_dir, kind, tag="") as staging:  # removed on failure, signals held
        yield staging
        files = written_paths(staging)
        _write_marker(staging, kind, files, "done", {path: _stamp(staging / path) for path in files})
        _default_permissions(staging)
        check_output_folder(out_dir, overwrite, sources)  # nothing foreign appeared there meanwhile
        _swap_in(staging, out_dir.expanduser().resolve(), kind)


def _swap_in(staging: Path, out: Path, kind: str) -> None:
    """Rename ``staging`` to ``out``; an existing ``out`` is renamed aside first and deleted only afterwards. If
    either rename fails, ``out`` stays (or is put back) as it was, its marker byte for byte (or absent, for an output
    written before markers), with nothing left beside it; a previous output that cannot be wholly deleted is named on
    stderr."""
    if not out.exists():
        staging.rename(out)
        return
    with held(), locked(out):  # held through the rename aside until deleted: a later run knows it is this run's
        old = _read_marker(out) or {}
        kept = (old.get("kind", kind), old.get("files", written_paths(out)))
        marker = out / MARKER
        before = (marker.read_bytes(), marker.stat()) if marker.is_file() and not marker.is_symlink() else None
        aside = _unused_name(out.parent, f".{out.name}{ASIDE}")
        try:
            _write_marker(out, *kept, "aside", old.get("stamps"))
            out.rename(aside)
        except BaseException as error:
            restored = _put_back(marker, before)
            if not isinstance(error, OSError):
                raise
            state = "it is unchanged" if restored else f"its {MARKER} marker could not be put back as it was"
            raise CompressorError(f"cannot replace {out}: {error.strerror or error}; {state}.") from None
        try:
            staging.rename(out)
        except BaseException:
            aside.rename(out)
            _put_back(marker, before)
            raise
        _delete_aside(aside, kept[0], out)


def _unused_name(parent: Path, prefix: str) -> Path:
    """A path in ``parent`` named ``prefix`` and eight random hex digits that nothing holds yet (nothing is made
    there: a folder renamed to it arrives whole)."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        if not os.path.lexists(path):
            return path


def _put_back(marker: Path, before: tuple[bytes, os.stat_result] | None) -> bool:
    """Restore ``marker`` to ``before`` (its content and stat when read; None: it did not exist): content, mode,
    modification time and, where this process may set them, owner and group; whether it is."""
    try:
        if before is None:
            marker.unlink(missing_ok=True)
        elif marker.read_bytes() != before[0] or marker.stat().st_mtime_ns != before[1].st_mtime_ns:
            _replace_marker(marker, before[0], like=before[1])
        return True
    except OSError:
        return False


def _delete_aside(aside: Path, kind: str, out: Path) -> None:
    """Delete the previous output renamed aside, first marked ``leftover`` (never put back) so that what cannot be
    deleted goes at the next run into ``out`` once this process is gone; name what stays on stderr. If it cannot be
    marked, it is kept whole."""
    try:
        _write_marker(aside, kind, [], "leftover")
    except OSError as error:
        print(f"kept {aside}, the output {out} replaced, whole: it could not be marked for deletion "
              f"({error.strerror or error}); delete it yourself", file=sys.stderr)
        return
    if not _delete_marked(aside):
        print(f"could not delete all of {aside}, the output {out} replaced; the next run into {out} tries again, or "
              "delete it yourself", file=sys.stderr)


def _default_permissions(folder: Path) -> None:
    """Temporary folders and files are private (0700/0600); give the result the user's usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
