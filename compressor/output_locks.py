"""Which run wrote a folder beside ``--out``, and whether that run still lives.

A run holds an exclusive ``flock`` on each folder it is writing or replacing (its staging folder, an output it renames
aside) for as long as it works on it; the kernel drops the lock when the process ends, however it ends. A later run
that can take the lock knows the writer is gone, whatever pid the writer had: pids are reused (a new container starts
again from 1), and a process in another pid or time namespace sees other pids and start times. Where a file system
takes no locks, or a marker was written before locks (no ``locked`` in it), the writer's pid decides, as it did
before, but only where the marker was written on this boot of this machine in this pid namespace (``PLACE``):
elsewhere its pid means nothing here, and the folder is kept.

``RUN`` names this process's run in its markers, so that a later run can tell this run's output from one written by
an unrelated process of the same pid.
"""

from __future__ import annotations

import errno
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from .errors import CompressorError

try:
    import fcntl
except ImportError:  # not on Windows: the pid decides
    fcntl = None

RUN = secrets.token_hex(8)
"""This process's run, as its markers name it."""

HELD: dict[tuple[int, int], int] = {}
"""(device, inode) of each folder this process holds locked -> the descriptor holding it."""

BUSY = (errno.EWOULDBLOCK, errno.EAGAIN)
TRIES = 20
"""How often ``locked`` tries a held folder, 50 ms apart, before it calls it another run's (a later run's
``lock_held`` takes the lock for an instant)."""


def _place() -> str | None:
    """This machine's boot and this process's pid namespace (Linux), in which a pid names one process; None where
    either cannot be read."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


PLACE = _place()
"""Where this process's pid means this process, as its markers record it."""


def identity(folder: Path) -> tuple[int, int] | None:
    """(device, inode) of ``folder``, which a rename keeps; None if it cannot be read."""
    try:
        info = folder.stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


def holding(folder: Path) -> bool:
    """Whether this process holds ``folder`` locked (its markers then say ``locked``)."""
    return identity(folder) in HELD


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` while the block runs (nothing, where its file system takes no lock).
    A folder another live process holds is refused in one sentence: another run is writing or replacing it."""
    descriptor = _open(folder)
    for attempt in range(TRIES if descriptor is not None else 0):
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as error:
            if error.errno in BUSY and attempt + 1 < TRIES:
                time.sleep(0.05)
                continue
            os.close(descriptor)
            if error.errno in BUSY:
                raise CompressorError(f"another compressor run is writing or replacing {folder}; wait for it to "
                                      "end, or choose another --out.") from None
            descriptor = None
            break
    key = identity(folder) if descriptor is not None else None
    if key is not None:
        HELD[key] = descriptor
    try:
        yield
    finally:
        if key is not None:
            HELD.pop(key, None)
        if descriptor is not None:
            with suppress(OSError):
                fcntl.flock(descriptor, fcntl.LOCK_UN)  # also for copies of the descriptor a forked child holds
            os.close(descriptor)


def lock_held(folder: Path) -> bool | None:
    """Whether a live process holds ``folder`` locked; None where that cannot be told (no locks here)."""
    if holding(folder):
        return True
    descriptor = _open(folder)
    if descriptor is None:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        return True if error.errno in BUSY else None
    finally:
        os.close(descriptor)  # also releases the lock just taken
    return False


def alive(marker: dict, held: bool | None) -> bool | None:
    """Whether the run that wrote ``marker`` still runs: by ``held`` (:func:`lock_held` of its folder) where the
    marker says its writer held a lock and locks can be told here; else by its pid (``marker["pid"]``, an int) where
    the marker was written in this ``PLACE`` (or before markers recorded one); None for a marker from another machine,
    boot or pid namespace, whose pid tells nothing here."""
    if marker.get("locked") is True and held is not None:
        return held
    if "place" in marker and marker["place"] != PLACE:
        return None
    try:
        os.kill(marker["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def same_run(marker: dict, other: dict) -> bool:
    """Whether two markers were written by one run (by ``RUN``; by pid for markers written before it)."""
    if "run" in marker or "run" in other:
        return marker.get("run") == other.get("run")
    return marker.get("pid") == other.get("pid")


def _open(folder: Path) -> int | None:
    """A read-only descriptor of ``folder`` itself (not through a link) to lock, or None (no locks here)."""
    if fcntl is None:
        return None
    try:
        return os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None


def _forget_in_child() -> None:
    """A forked child holds none of its parent's folders: it closes its copies of their descriptors (which leaves
    the parent's locks as they are), so that they go when the parent ends."""
    for descriptor in HELD.values():
        with suppress(OSError):
            os.close(descriptor)
    HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
