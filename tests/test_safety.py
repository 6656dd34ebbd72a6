"""Never lose a user's file: output folders, damaged inputs, unwritable outputs, interrupts, a fast front door."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from compressor.errors import CompressorError
from compressor import interrupts, output_locks, outputs
from compressor.outputs import MARKER, check_output_folder, remove_stale_staging, scratch_folder, staging_folder
from conftest import FIXTURE, assert_user_error, invoke

FAST = ["--method", "norm", "--samples", "2", "--seq-len", "128", "--no-verify"]
COMPRESS = [sys.executable, "-m", "compressor"]


def user_files(folder: Path) -> dict[str, str]:
    (folder / "src").mkdir(parents=True)
    files = {"src/main.py": "print('mine')\n", "TODO.txt": "keep me\n"}
    for name, text in files.items():
        (folder / name).write_text(text)
    return files


def assert_intact(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        assert (folder / name).read_text() == text, f"{name} was lost"


def test_out_dot_with_overwrite_is_refused_and_deletes_nothing(tmp_path, monkeypatch):
    files = user_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    result = invoke("prune", FIXTURE, "--out", ".", "--overwrite", *FAST)
    assert_user_error(result, "current folder")
    assert_intact(tmp_path, files)


def test_out_holding_the_source_model_is_refused(tmp_path):
    source = tmp_path / "parent" / "model"
    shutil.copytree(FIXTURE, source)
    (tmp_path / "parent" / "notes.txt").write_text("notes\n")
    result = invoke("prune", source, "--out", tmp_path / "parent", "--overwrite", *FAST)
    assert_user_error(result, "source model")
    assert (tmp_path / "parent" / "notes.txt").read_text() == "notes\n"
    assert sorted(p.name for p in source.iterdir()) == sorted(p.name for p in FIXTURE.iterdir())
    inside = invoke("prune", source, "--out", source / "pruned", *FAST)
    assert_user_error(inside, "source model")


def test_analyze_overwrite_refuses_a_folder_with_foreign_files(tmp_path):
    out = tmp_path / "proj"
    out.mkdir()
    (out / "keep.txt").write_text("keep\n")
    result = invoke("analyze", FIXTURE, "--out", out, "--overwrite", "--samples", "2", "--seq-len", "128")
    assert_user_error(result, "keep.txt", "which compressor did not write", "choose another --out")
    assert (out / "keep.txt").read_text() == "keep\n"


def test_overwrite_replaces_an_earlier_output_and_then_refuses_foreign_additions(tmp_path):
    out = tmp_path / "pruned"
    assert invoke("prune", FIXTURE, "--out", out, *FAST).exit_code == 0
    assert (out / MARKER).is_file() and (out / "compression.json").is_file()
    assert_user_error(invoke("prune", FIXTURE, "--out", out, *FAST), "already exists", "pass --overwrite")
    again = invoke("prune", FIXTURE, "--out", out, "--overwrite", *FAST, "--state-reduction", "0.2")
    assert again.exit_code == 0, again.output
    assert '"state_reduction": 0.2' in (out / "compression.json").read_text()
    (out / "my-notes.md").write_text("mine\n")
    refused = invoke("prune", FIXTURE, "--out", out, "--overwrite", *FAST)
    assert_user_error(refused, "my-notes.md", "added or changed after compressor wrote it", "move it out")
    assert (out / "my-notes.md").read_text() == "mine\n"
    assert not list(tmp_path.glob(".pruned.*")), "a staging folder was left behind"


def test_overwrite_refuses_a_file_the_user_saved_over_one_of_compressors(tmp_path):
    """The marker keeps each file's size and modification time: a file written again (a fine-tuned model saved
    into the output, an edited config) is the user's, and --overwrite refuses to replace it."""
    out = tmp_path / "pruned"
    with staging_folder(out, overwrite=False) as staging:
        (staging / "config.json").write_text('{"a": 1}')
        (staging / "model.safetensors").write_bytes(b"weights")
    with staging_folder(out, overwrite=True) as staging:  # unchanged: replaced
        (staging / "config.json").write_text('{"a": 2}')
    assert (out / "config.json").read_text() == '{"a": 2}'
    (out / "config.json").write_text('{"a": 3, "mine": true}')
    with pytest.raises(CompressorError, match="config.json, added or changed after compressor wrote it"):
        with staging_folder(out, overwrite=True) as staging:
            (staging / "config.json").write_text('{"a": 4}')
    os.utime(out / "config.json", ns=(0, 0))  # the same size, another modification time: still the user's
    with pytest.raises(CompressorError, match="config.json, added or changed"):
        check_output_folder(out, overwrite=True)
    assert (out / "config.json").read_text() == '{"a": 3, "mine": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]


def test_a_failure_while_writing_leaves_the_previous_output_intact(tmp_path):
    out = tmp_path / "out"
    with staging_folder(out, overwrite=False, kind="analyze") as staging:
        (staging / "report.json").write_text("{}\n")
    with pytest.raises(RuntimeError), staging_folder(out, overwrite=True, kind="analyze") as staging:
        (staging / "report.json").write_text("new\n")
        raise RuntimeError("disk full")
    assert (out / "report.json").read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _earlier_output(out: Path, earlier: str) -> dict[str, tuple[bytes, int, int, int]]:
    """Write an earlier output into ``out``: ``marked`` by another (dead) process, or ``unmarked`` (written before
    markers existed); returns every entry's (content, mtime, mode) and the folder's own."""
    if earlier == "marked":
        with staging_folder(out, overwrite=False, kind="analyze") as staging:
            (staging / "report.json").write_text("{}\n")
        (out / MARKER).write_text((out / MARKER).read_text().replace(f'"pid": {os.getpid()}', f'"pid": {_dead_pid()}')
                                  .replace(output_locks.RUN, "0" * 16))
        (out / MARKER).chmod(0o600)  # not the mode compressor writes: a marker put back keeps it
        if os.geteuid() == 0:
            os.chown(out / MARKER, 4001, 4001)  # nor the owner: it keeps that too
    else:
        out.mkdir()
        for name in ("config.json", "compression.json"):
            (out / name).write_text("{}\n")
    return _snapshot(out)


def _snapshot(out: Path) -> dict[str, tuple[bytes, int, int, int]]:
    """Every entry's (content, mtime, mode, owner) and the folder's own."""
    found = {path.name: (path.read_bytes(), path.stat().st_mtime_ns, path.stat().st_mode, path.stat().st_uid)
             for path in out.iterdir()}
    return {**found, ".": (b"", out.stat().st_mtime_ns, out.stat().st_mode, out.stat().st_uid)}


@pytest.mark.parametrize("earlier", ["marked", "unmarked"])
@pytest.mark.parametrize("failing", ["out to aside", "staging to out"])
def test_a_swap_whose_rename_fails_leaves_the_earlier_output_as_it_was(tmp_path, monkeypatch, earlier, failing):
    """Either rename of the swap fails (a mount point, a full or vanished file system): the earlier output stays or
    is put back as it was, its marker byte for byte and mode (another process wrote it) or still absent (an output written
    before markers), with nothing left beside it."""
    out = (tmp_path / "out").resolve()
    before = _earlier_output(out, earlier)
    del before["."]  # the marker is rewritten in it, and put back
    rename = Path.rename

    def refuse(self, target):
        if Path(self) == out if failing == "out to aside" else Path(self).name.startswith(".out.partial-"):
            raise OSError(16, "Device or resource busy", str(self), None, str(target))
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", refuse)
    expected = (r"^cannot replace .*out: Device or resource busy; it is unchanged\.$" if failing == "out to aside"
                else "Device or resource busy")
    with pytest.raises((CompressorError, OSError), match=expected):
        with staging_folder(out, overwrite=True, kind="analyze") as staging:
            (staging / "report.json").write_text("new\n")
    after = _snapshot(out)
    del after["."]
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_marker_that_cannot_be_put_back_is_said(tmp_path, monkeypatch):
    out = (tmp_path / "out").resolve()
    _earlier_output(out, "marked")
    monkeypatch.setattr(outputs, "_put_back", lambda marker, before: False)
    monkeypatch.setattr(Path, "rename", lambda self, target: (_ for _ in ()).throw(OSError(16, "Device busy")))
    with pytest.raises(CompressorError, match=r"its \.compressor marker could not be put back as it was\.$"):
        with staging_folder(out, overwrite=True, kind="analyze"):
            pass


def test_what_cannot_be_deleted_of_a_replaced_output_goes_at_a_later_run(tmp_path, monkeypatch, capsys):
    """Deleting the output renamed aside fails on one file, twice: it keeps its ``leftover`` marker (deleted last),
    is named on stderr, is retried by each later run into --out once this process is gone, goes when it can, and is
    never put back as the output, even with --out gone."""
    out = tmp_path / "out"
    with staging_folder(out, overwrite=False, kind="analyze") as staging:
        (staging / "report.json").write_text("{}\n")
        (staging / "z.bin").write_text("stuck")
    unlink = Path.unlink

    def stuck(self, missing_ok=False):
        if self.name == "z.bin" and self.parent.name.startswith(".out.old-"):
            raise PermissionError(1, "Operation not permitted", str(self))
        return unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", stuck)
    with staging_folder(out, overwrite=True, kind="analyze") as staging:
        (staging / "report.json").write_text("new\n")
    [leftover] = [p for p in tmp_path.iterdir() if p.name.startswith(".out.old-")]
    err = capsys.readouterr().err
    assert f"could not delete all of {leftover}" in err and "tries again" in err
    assert sorted(p.name for p in leftover.iterdir()) == [MARKER, "z.bin"]
    assert remove_stale_staging(out) == []  # this process is alive: not yet
    (leftover / MARKER).write_text((leftover / MARKER).read_text().replace(f'"pid": {os.getpid()}',
                                                                             f'"pid": {_dead_pid()}'))
    shutil.rmtree(out)
    assert remove_stale_staging(out) == [] and sorted(p.name for p in leftover.iterdir()) == [MARKER, "z.bin"]
    assert '"state": "leftover"' in (leftover / MARKER).read_text() and not out.exists()
    monkeypatch.setattr(Path, "unlink", unlink)
    (leftover / MARKER).write_text((leftover / MARKER).read_text().replace(f'"pid": {os.getpid()}',
                                                                             f'"pid": {_dead_pid()}'))
    assert remove_stale_staging(out) == [leftover.resolve()]
    assert list(tmp_path.iterdir()) == []


def test_a_finished_folder_named_like_an_aside_one_is_kept(tmp_path):
    """Only folders compressor marked as being replaced (``aside``) or not wholly deleted (``leftover``) go: a
    finished output copied to ``.out.old-2024`` stays, as does one of a live process."""
    out = tmp_path / "out"
    _earlier_output(out, "marked")
    shutil.copytree(out, tmp_path / ".out.old-2024")
    assert remove_stale_staging(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.old-2024", "out"]


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


@pytest.mark.parametrize("name", ["out", "r[1]", "a*b"])
def test_every_leftover_of_a_killed_run_goes_at_the_next_run(tmp_path, name):
    """A killed run can leave a staging folder still being written, one built and marked done but not yet swapped
    in, or a scratch folder (prune --heal's unhealed model, heal's top-k cache); the next run into the same --out
    removes them all, whatever characters the name holds, and nothing it did not write."""
    out, dead = tmp_path / name, _dead_pid()
    a, b, c = ".partial-a1b2c3d4", ".partial-e5f6g7h8", ".partial-unhealed-i9j0k1l2"  # mkdtemp's 8 characters
    for suffix, state in ((a, "staging"), (b, "done"), (c, "staging")):
        (tmp_path / f".{name}{suffix}").mkdir()
        (tmp_path / f".{name}{suffix}" / MARKER).write_text(
            f'{{"written_by": "compressor", "state": "{state}", "pid": {dead}, "files": []}}')
    (tmp_path / f".{name}{c}" / "pruned").mkdir()
    (tmp_path / f".{name}.partial-mine0000").mkdir()  # no marker: not compressor's
    (tmp_path / f".{name}.partial-mine0000" / "notes.txt").write_text("mine")
    (tmp_path / f".{name}.partial-zyxw9876").mkdir()  # empty: a run killed before it wrote the marker
    removed = remove_stale_staging(out)
    assert sorted(p.name for p in removed) == [f".{name}{a}", f".{name}{b}", f".{name}{c}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{name}.partial-mine0000"]


def test_a_scratch_folder_is_marked_as_staging_and_removed_after_its_block(tmp_path):
    out = tmp_path / "deep" / "out"
    with pytest.raises(RuntimeError), scratch_folder(out, "unhealed") as folder:
        assert folder.parent == out.parent and folder.name.startswith(".out.partial-unhealed-")
        assert '"state": "staging"' in (folder / MARKER).read_text()
        assert remove_stale_staging(out) == []  # a live run's scratch folder stays
        (folder / "pruned").mkdir()
        raise RuntimeError("heal failed")
    assert list(out.parent.iterdir()) == []


def test_signals_inside_a_held_block_are_raised_after_it(monkeypatch):
    """While an output is swapped in, a Ctrl-C handled for another thread (the kernel may give the signal to any
    thread; Python runs its handler in the main thread) is noted, not raised, and raised when the outermost block
    ends."""
    monkeypatch.setattr(interrupts, "received", [])
    steps = []
    with pytest.raises(interrupts.Interrupted) as raised:
        with interrupts.held():
            with interrupts.held():
                interrupts.interrupt(signal.SIGTERM, None)
                steps.append("inner")
            interrupts.interrupt(signal.SIGINT, None)  # the first signal is the one raised
            steps.append("outer")
    assert steps == ["inner", "outer"] and raised.value.signum == signal.SIGTERM
    assert interrupts.holding == {"depth": 0, "pending": None}
    with interrupts.held():
        steps.append("quiet")
    with pytest.raises(interrupts.Interrupted):  # outside a held block the handler raises at once
        interrupts.interrupt(signal.SIGINT, None)


def test_stale_staging_of_a_dead_process_is_removed_and_a_live_one_kept(tmp_path):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for name, pid in ((".out.partial-dead0000", int(dead.stdout)), (".out.partial-live0000", os.getpid())):
        (tmp_path / name).mkdir()
        (tmp_path / name / MARKER).write_text(
            f'{{"written_by": "compressor", "state": "staging", "pid": {pid}, "files": []}}')
    (tmp_path / ".out.partial-foreign0").mkdir()  # no marker: not ours, never touched
    (tmp_path / ".out.partial-foreign0" / "notes.txt").write_text("mine")
    assert remove_stale_staging(out) == [(tmp_path / ".out.partial-dead0000").resolve()]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.partial-foreign0", ".out.partial-live0000"]


HOLD_LOCK = """
import fcntl, os, sys, time
descriptor = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
fcntl.flock(descriptor, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


def test_the_lock_not_the_pid_tells_a_live_run(tmp_path):
    """A marker that says its writer holds a lock is judged by the lock: a folder no process holds is a dead run's
    even where a live process has its pid (pids are reused: a new container's, or one in another pid namespace);
    a folder another process holds is a live run's even where its pid is gone. Markers without ``locked`` (written
    before locks) are judged by the pid, as before."""
    dead = _dead_pid()
    folders = {"reused00": (os.getpid(), True), "holder00": (dead, True), "before00": (os.getpid(), False)}
    for name, (pid, lock) in folders.items():
        (tmp_path / f".out.partial-{name}").mkdir()
        (tmp_path / f".out.partial-{name}" / MARKER).write_text(json.dumps(
            {"written_by": "compressor", "state": "staging", "pid": pid, "files": [], **({"locked": True} if lock else {})}))
    writing = tmp_path / ".out.partial-holder00" / f"{MARKER}.partial-0badc0de"
    writing.write_bytes(b"")  # the marker the live run is writing now: left alone
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / ".out.partial-holder00")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert remove_stale_staging(tmp_path / "out") == [(tmp_path / ".out.partial-reused00").resolve()]
        assert writing.exists()
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.partial-before00", ".out.partial-holder00"]
    assert remove_stale_staging(tmp_path / "out") == [(tmp_path / ".out.partial-holder00").resolve()]


def test_a_marker_from_another_machine_or_pid_namespace_is_never_judged_by_its_pid(tmp_path, capsys):
    """Without a lock to tell, a pid is only checked where it was recorded: a dead pid from another boot, machine or
    pid namespace may be a live process there, so its folder is kept and named; from this place it is a dead
    run's."""
    dead = _dead_pid()
    for name, place in (("elsewher", "another-boot:4026531836"), ("here0000", output_locks.PLACE)):
        (tmp_path / f".out.partial-{name}").mkdir()
        (tmp_path / f".out.partial-{name}" / MARKER).write_text(json.dumps(
            {"written_by": "compressor", "state": "staging", "pid": dead, "place": place, "files": []}))
    assert remove_stale_staging(tmp_path / "out") == [(tmp_path / ".out.partial-here0000").resolve()]
    assert [p.name for p in tmp_path.iterdir()] == [".out.partial-elsewher"]
    assert f"kept {(tmp_path / '.out.partial-elsewher').resolve()}: a run on another machine" in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_child_does_not_keep_its_parents_folders_locked(tmp_path):
    """A child forked while a run holds its staging folder holds none of it: once the run ends, a next run into the
    same --out is not taken for a concurrent one while the child lives."""
    out = tmp_path / "out"
    read, write = os.pipe()
    with staging_folder(out, overwrite=False) as staging:
        (staging / "config.json").write_text("{}")
        child = os.fork()
        if child == 0:
            os.write(write, str(len(output_locks.HELD)).encode())
            time.sleep(30)
            os._exit(0)
    try:
        assert os.read(read, 8) == b"0"
        with staging_folder(out, overwrite=True) as staging:
            (staging / "config.json").write_text('{"a": 1}')
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    assert (out / "config.json").read_text() == '{"a": 1}'


def test_a_run_holds_its_staging_folder_locked_and_names_itself_in_its_markers(tmp_path):
    """While a run writes, another process sees its staging folder held (and leaves it); the output's marker names
    the run; an output that run is replacing is held too: a second run into it is refused in one sentence."""
    out = tmp_path / "out"
    with staging_folder(out, overwrite=False) as staging:
        marker = json.loads((staging / MARKER).read_text())
        assert (marker["locked"], marker["run"], marker["pid"]) == (True, output_locks.RUN, os.getpid())
        look = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                               "from compressor.outputs import remove_stale_staging as r; print(r(Path(sys.argv[1])))",
                               str(out)], capture_output=True, text=True, cwd=Path(__file__).parents[1])
        assert look.stdout.strip() == "[]", look.stderr
        (staging / "config.json").write_text("{}")
    assert json.loads((out / MARKER).read_text())["run"] == output_locks.RUN
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CompressorError, match=r"^another compressor run is writing or replacing .*out; wait"):
            with staging_folder(out, overwrite=True) as staging:
                (staging / "config.json").write_text('{"new": 1}')
    finally:
        holder.kill()
        holder.wait()
    assert (out / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_out_that_is_a_parent_of_the_current_folder_is_refused(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(CompressorError, match="current folder"):
        check_output_folder(tmp_path, overwrite=True)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
@pytest.mark.parametrize("command", ["prune", "eval"])
def test_damaged_weights_are_named_in_one_sentence(tmp_path, damage, command):
    model = tmp_path / "model"
    shutil.copytree(FIXTURE, model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x7fELF" * 64}[damage])
    args = ["prune", model, "--out", tmp_path / "out", *FAST] if command == "prune" else ["eval", model]
    assert_user_error(invoke(*args), "model.safetensors", "damaged")
    assert not (tmp_path / "out").exists()


def test_unwritable_output_fails_before_the_model_loads(tmp_path, no_model_load):
    if os.geteuid() == 0:  # root writes anywhere: make the parent a file instead
        parent = tmp_path / "a-file"
        parent.write_text("")
    else:
        parent = tmp_path / "locked"
        parent.mkdir()
        parent.chmod(0o500)
    assert_user_error(invoke("prune", FIXTURE, "--out", parent / "out", *FAST), "cannot write")


@pytest.mark.parametrize("obstacle", ["mount point", "read-only folder", "immutable marker"])
def test_an_earlier_output_that_cannot_be_replaced_fails_before_the_model_loads(tmp_path, monkeypatch, obstacle,
                                                                              no_model_load):
    """An earlier output in a mount point (it cannot be renamed aside), or whose folder or marker cannot change
    (read-only, immutable, append-only), is refused before loading, in one sentence, and stays as it was; so does a
    dry run, which writes nothing in it."""
    out = (tmp_path / "out").resolve()
    before = _earlier_output(out, "marked")
    if obstacle == "mount point":
        table = tmp_path.parent / f"{tmp_path.name}-mountinfo"
        table.write_bytes(b"36 35 98:0 /x " + os.fsencode(out) + b" rw - ext4 /dev/a rw\n")
        monkeypatch.setattr(outputs, "MOUNT_TABLE", table)  # a bind mount on the same file system: ismount misses it
    elif obstacle == "read-only folder":
        access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: access(path, mode) and not (
            Path(path) == out and mode & os.W_OK))
    else:
        monkeypatch.setattr(outputs, "_unchangeable", lambda path: Path(path) == out / MARKER)
    for extra in ([], ["--dry-run"]):
        message = assert_user_error(invoke("prune", FIXTURE, "--out", out, "--overwrite", *FAST, *extra),
                                    "cannot replace")
        assert ("mount point" if obstacle == "mount point" else "read-only, immutable or append-only") in message
        assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_mount_points_are_read_from_the_mount_table_as_linux_escapes_them(tmp_path, monkeypatch):
    """Space, tab, newline and backslash are octal escapes there; a mount point whose name is not UTF-8 is read."""
    table = tmp_path / "mountinfo"
    table.write_bytes(b"36 35 98:0 / /mnt/\xffodd rw - ext4 /dev/a rw\n"
                      b"37 35 98:0 /x /srv/my\\040models\\134x rw - ext4 /dev/a rw\n")
    monkeypatch.setattr(outputs, "MOUNT_TABLE", table)
    assert outputs._mount_point(Path("/srv/my models\\x")) and outputs._mount_point(Path(os.fsdecode(b"/mnt/\xffodd")))
    assert not outputs._mount_point(Path("/srv/my"))


def test_a_dry_run_over_an_earlier_output_changes_nothing_in_it_or_beside_it(tmp_path):
    out = (tmp_path / "out").resolve()
    before = _earlier_output(out, "marked")
    os.utime(tmp_path, ns=(0, 10**18))
    assert invoke("prune", FIXTURE, "--out", out, "--overwrite", "--dry-run", *FAST[:-1]).exit_code == 0
    assert _snapshot(out) == before
    assert tmp_path.stat().st_mtime_ns == 10**18  # no probe folder made and removed beside it


def test_a_dry_run_into_a_folder_that_cannot_be_written_is_refused(tmp_path, monkeypatch, no_model_load):
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: access(path, mode) and Path(path) != tmp_path.resolve())
    assert_user_error(invoke("prune", FIXTURE, "--out", tmp_path / "out", "--dry-run", *FAST),
                      "cannot write the output beside")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("chattr") is None, reason="chattr needs root")
@pytest.mark.parametrize("flag, where", [("+i", "folder"), ("+a", "folder"), ("+i", "marker"), ("+a", "marker")])
def test_an_immutable_or_append_only_earlier_output_is_refused_before_the_model_loads(tmp_path, no_model_load, flag,
                                                                                      where):
    out = (tmp_path / "out").resolve()
    before = _earlier_output(out, "marked")
    locked = out if where == "folder" else out / MARKER
    if subprocess.run(["chattr", flag, str(locked)], capture_output=True).returncode != 0:
        pytest.skip("this file system takes no such flag")
    try:
        assert_user_error(invoke("prune", FIXTURE, "--out", out, "--overwrite", *FAST), "immutable or append-only")
        assert _snapshot(out) == before
    finally:
        subprocess.run(["chattr", "-" + flag[1:], str(locked)])


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("chattr") is None, reason="chattr needs root")
@pytest.mark.parametrize("flag", ["+i", "+a"])
def test_an_immutable_or_append_only_parent_is_refused_with_nothing_left_in_it(tmp_path, no_model_load, flag):
    parent = tmp_path / "models"
    parent.mkdir()
    if subprocess.run(["chattr", flag, str(parent)], capture_output=True).returncode != 0:
        pytest.skip("this file system takes no such flag")
    try:
        assert_user_error(invoke("prune", FIXTURE, "--out", parent / "out", *FAST), "immutable or append-only")
        assert list(parent.iterdir()) == []
    finally:
        subprocess.run(["chattr", "-" + flag[1:], str(parent)])


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="giving folders to others needs root")
@pytest.mark.parametrize("user, sticky, refused", [("another", True, True), ("the folder's owner", True, False),
                                                    ("the output's owner", True, False), ("another", False, False)])
def test_another_users_output_in_a_sticky_folder_is_refused_before_anything_runs(tmp_path, monkeypatch, user, sticky,
                                                                                 refused):
    """In a sticky folder (as /tmp) only the owner of an output, or of the folder, may rename it: any other user is
    refused at once, not after calibration (the folder and the output get two owners; this process looks like a
    third user or one of them)."""
    parent = tmp_path / "shared"
    parent.mkdir()
    parent.chmod(0o1777 if sticky else 0o777)
    out = parent / "out"
    _earlier_output(out, "marked")
    os.chown(parent, 4001, 4001)
    os.chown(out, 4002, 4002)
    uid = {"another": 4003, "the folder's owner": 4001, "the output's owner": 4002}[user]
    monkeypatch.setattr(outputs.os, "geteuid", lambda: uid)
    if refused:
        with pytest.raises(CompressorError, match="another user owns it and its folder is sticky"):
            outputs.check_replaceable(out)
    else:
        outputs.check_replaceable(out)


def test_a_folder_that_cannot_be_listed_in_an_earlier_output_is_named_not_replaced(tmp_path, monkeypatch):
    """What a subfolder the user closed holds is unknown, so --overwrite names it instead of deleting it."""
    out = (tmp_path / "out").resolve()
    _earlier_output(out, "marked")
    (out / "private").mkdir()
    (out / "private" / "diary.txt").write_text("mine")
    scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path=".": (_ for _ in ()).throw(PermissionError(
        13, "Permission denied", str(path))) if Path(path).name == "private" else scandir(path))
    with pytest.raises(CompressorError, match="private/"):
        check_output_folder(out, overwrite=True)


@pytest.mark.parametrize("content, where", [
    ({".cache/huggingface/hub/models--org--big/blobs/abc": "weights"}, "a download cache"),
    ({"config.json": "{}", "compression.json": "{}", ".cache/huggingface/download/model.safetensors.metadata": "x"},
     "a downloaded copy of a pushed output"),
    ({".compressor": '{"level": 9, "algo": "zstd"}'}, "another tool's .compressor"),
    ({"config.json": "{}", "compression.json": "{}", ".compressor": "level=9"}, "a legacy output with it"),
])
def test_files_compressor_did_not_write_are_never_taken_for_its_own(tmp_path, content, where):
    out = tmp_path / "out"
    for name, text in content.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    foreign = [name for name in content if name not in ("config.json", "compression.json")]
    with pytest.raises(CompressorError, match=re.escape(foreign[0])):
        check_output_folder(out, overwrite=True)
    assert {name: (out / name).read_text() for name in content} == content


def test_a_marker_a_killed_run_was_writing_goes_at_the_next_run(tmp_path):
    """A run killed while it rewrote the marker of --out left ``.compressor.partial-*``: the next run deletes it (and
    an empty one), keeps a file of that name whose content is the user's, and names only that one."""
    out = (tmp_path / "out").resolve()
    _earlier_output(out, "marked")
    (out / ".compressor.partial-0a1b2c3d").write_bytes(b'{\n "written_by": "compressor", "ki')
    (out / ".compressor.partial-4e5f6a7b").write_bytes(b"")
    (out / ".compressor.partial-8c9d0e1f").write_text("mine")
    remove_stale_staging(out)
    assert sorted(p.name for p in out.iterdir()) == [".compressor", ".compressor.partial-8c9d0e1f", "report.json"]
    with pytest.raises(CompressorError, match=r"\.compressor\.partial-8c9d0e1f, added or changed"):
        check_output_folder(out, overwrite=True)


def test_files_named_as_half_written_markers_in_a_users_folder_are_the_users(tmp_path):
    """--out holding a folder compressor never wrote (no marker): nothing in it is touched, even an empty file named
    as compressor's half-written markers are."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".compressor.partial-4e5f6a7b").write_bytes(b"")
    remove_stale_staging(out)
    assert [p.name for p in out.iterdir()] == [".compressor.partial-4e5f6a7b"]


def test_a_lock_a_reader_holds_for_an_instant_is_waited_for(tmp_path):
    """A later run's cleanup takes a folder's lock for an instant to see whether its writer lives; a run locking
    that folder meanwhile waits for it instead of calling the folder another run's."""
    folder = tmp_path / "folder"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK.replace("time.sleep(60)", "time.sleep(0.3)"),
                               str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with output_locks.locked(folder):
            assert output_locks.holding(folder)
    finally:
        holder.kill()
        holder.wait()


def test_where_the_file_system_takes_no_lock_markers_say_so_and_the_pid_decides(tmp_path, monkeypatch):
    """A file system without locks (flock fails with ENOLCK): the run goes on unlocked, its markers do not claim a
    lock, and a later run judges them by pid."""
    import errno
    import fcntl

    def no_locks(descriptor, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "out"
    with staging_folder(out, overwrite=False) as staging:
        assert "locked" not in json.loads((staging / MARKER).read_text())
        assert output_locks.lock_held(staging) is None
        assert remove_stale_staging(out) == []  # this process's pid: a live run's
        (staging / "config.json").write_text("{}")
    assert (out / "config.json").read_text() == "{}" and output_locks.HELD == {}


def test_a_users_file_named_like_a_marker_being_written_is_theirs(tmp_path):
    """A ``.compressor.partial`` in an earlier output is the user's: --overwrite names it, never writing through it."""
    out = (tmp_path / "out").resolve()
    _earlier_output(out, "marked")
    target = tmp_path / "mine.txt"
    target.write_text("mine\n")
    (out / ".compressor.partial").symlink_to(target)
    with pytest.raises(CompressorError, match=r"\.compressor\.partial"):
        check_output_folder(out, overwrite=True)
    assert target.read_text() == "mine\n"


def test_an_aside_output_is_kept_when_out_holds_another_folder(tmp_path, capsys):
    """A run killed between its two renames left the previous output aside; the user then made a new --out of their
    own: the aside output is kept and named, never deleted."""
    out = tmp_path / "out"
    aside = tmp_path / ".out.old-0123abcd"
    aside.mkdir()
    (aside / "report.json").write_text("{}")
    (aside / MARKER).write_text(f'{{"written_by": "compressor", "state": "aside", "pid": {_dead_pid()}, '
                                '"files": ["report.json"]}')
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert remove_stale_staging(out) == []
    assert (aside / "report.json").exists() and f"kept {aside.resolve()}" in capsys.readouterr().err


def test_an_aside_output_replaced_by_its_runs_new_one_goes_and_is_never_put_back_once_partly_gone(tmp_path,
                                                                                                  monkeypatch):
    """A run was killed after swapping its new output in, before deleting the old one: the next run deletes the old
    one; what it cannot delete is marked ``leftover`` first, so it is never put back as the output."""
    out, dead = tmp_path / "out", _dead_pid()
    aside = tmp_path / ".out.old-0123abcd"
    for folder, state, name in ((out, "done", "new.json"), (aside, "aside", "z.bin")):
        folder.mkdir()
        (folder / name).write_text("{}")
        (folder / MARKER).write_text(f'{{"written_by": "compressor", "state": "{state}", "pid": {dead}, '
                                     f'"files": ["{name}"]}}')
    unlink = Path.unlink
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: (_ for _ in ()).throw(
        PermissionError(1, "Operation not permitted")) if self.name == "z.bin" else unlink(self, missing_ok))
    assert remove_stale_staging(out) == [] and '"state": "leftover"' in (aside / MARKER).read_text()
    shutil.rmtree(out)
    (aside / MARKER).write_text((aside / MARKER).read_text().replace(f'"pid": {os.getpid()}', f'"pid": {dead}'))
    assert remove_stale_staging(out) == [] and not out.exists()
    monkeypatch.setattr(Path, "unlink", unlink)
    assert remove_stale_staging(out) == [aside.resolve()]


def test_an_aside_output_is_deleted_only_for_the_output_of_its_own_run_not_of_a_reused_pid(tmp_path, capsys):
    """A dead run's aside output goes only when ``--out`` holds that run's new output: an output of another run that
    had the same pid (pids are reused) leaves it kept and named."""
    out, dead = tmp_path / "out", _dead_pid()
    aside = tmp_path / ".out.old-0123abcd"
    for folder, state, run in ((out, "done", "b" * 16), (aside, "aside", "a" * 16)):
        folder.mkdir()
        (folder / MARKER).write_text(json.dumps({"written_by": "compressor", "state": state, "pid": dead, "run": run,
                                                 "files": []}))
    assert remove_stale_staging(out) == [] and aside.is_dir()
    assert f"kept {aside.resolve()}" in capsys.readouterr().err
    (out / MARKER).write_text(json.dumps({"written_by": "compressor", "state": "done", "pid": dead, "files": []}))
    assert remove_stale_staging(out) == [] and aside.is_dir()  # a marker naming no run is not that run's
    (out / MARKER).write_text((out / MARKER).read_text().replace(f'"pid": {dead}', f'"pid": {dead}, "run": "{"a" * 16}"'))
    assert remove_stale_staging(out) == [aside.resolve()]


def test_a_replaced_output_that_cannot_be_marked_for_deletion_is_kept_whole(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    with staging_folder(out, overwrite=False, kind="analyze") as staging:
        (staging / "report.json").write_text("{}\n")
    write_marker = outputs._write_marker

    def disk_full(folder, kind, files, state, stamps=None):
        if state == "leftover":
            raise OSError(28, "No space left on device")
        return write_marker(folder, kind, files, state, stamps)

    monkeypatch.setattr(outputs, "_write_marker", disk_full)
    with staging_folder(out, overwrite=True, kind="analyze") as staging:
        (staging / "report.json").write_text("new\n")
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith(".out.old-")]
    assert (aside / "report.json").read_text() == "{}\n" and "whole" in capsys.readouterr().err


def test_an_unwritable_json_folder_fails_before_the_model_loads(tmp_path, no_model_load):
    if os.geteuid() == 0:  # root writes anywhere but in /proc
        folder = Path("/proc/self")
    else:
        folder = tmp_path / "locked"
        folder.mkdir()
        folder.chmod(0o500)
    assert_user_error(invoke("eval", FIXTURE, "--json", folder / "figures.json"), "cannot write --json")


@pytest.mark.parametrize("content", [b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8, b"\xff\xfe\xfa" * 100,
                                     "".join(chr(i % 32) for i in range(2000)).encode()])
def test_binary_calibration_files_are_refused(tmp_path, content):
    calib = tmp_path / "libfoo.so"
    calib.write_bytes(content)
    assert_user_error(invoke("prune", FIXTURE, "--calib", calib, "--dry-run", *FAST), "libfoo.so")


def test_literal_calibration_text_needs_its_prefix(tmp_path):
    assert_user_error(invoke("prune", FIXTURE, "--calib", "some words here", "--dry-run", *FAST), "text:")


def test_usage_errors_exit_2_and_user_errors_exit_1(tmp_path):
    assert invoke("prune", FIXTURE, "--state-reduction", "abc", "--dry-run").exit_code == 2
    assert invoke("prune", FIXTURE, "--state-reduction", "1.5", "--dry-run").exit_code == 1


def test_help_imports_neither_torch_nor_transformers():
    script = ("import sys\nfrom click.testing import CliRunner\nfrom compressor.cli import main\n"
              "for args in ([\"--help\"], [\"prune\", \"--help\"], [\"analyze\", \"--help\"]):\n"
              "    assert CliRunner().invoke(main, args).exit_code == 0\n"
              "heavy = [m for m in ('torch', 'transformers', 'compressor.families') if m in sys.modules]\n"
              "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


def test_the_api_imports_fla_without_its_cpu_warning():
    """fla warns on import when Triton has no GPU; importing it through compressor's API keeps that quiet (that
    warning is an error in this process)."""
    pytest.importorskip("fla")
    subprocess.run([sys.executable, "-W", "error:Triton is not supported on current platform:UserWarning", "-c",
                    "import compressor.families"], check=True, timeout=120)


@pytest.mark.slow
def test_import_compressor_registers_nothing():
    script = ("import compressor, transformers\n"
              "from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING\n"
              "assert not MODEL_FOR_CAUSAL_LM_MAPPING._extra_content, MODEL_FOR_CAUSAL_LM_MAPPING._extra_content\n"
              "compressor.register()\n"
              "assert MODEL_FOR_CAUSAL_LM_MAPPING._extra_content\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


def run_until(args: list, ready, sig: int, tmp_path: Path) -> subprocess.CompletedProcess:
    """Start ``compress args``, send ``sig`` once ``ready(process)`` holds, and return the finished process."""
    process = subprocess.Popen([*COMPRESS, *map(str, args)], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 300
    while not ready(process) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, f"the command ended before the signal: {process.communicate()}"
    process.send_signal(sig)
    out, err = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.mark.slow
def test_sigterm_while_writing_leaves_nothing_and_the_next_run_succeeds(tmp_path):
    out = tmp_path / "out"
    args = ["prune", FIXTURE, "--out", out, "--method", "norm", "--samples", "2", "--seq-len", "128"]
    killed = run_until(args, lambda _: any(tmp_path.glob(".out.partial-*/model.safetensors")), signal.SIGTERM,
                       tmp_path)
    assert killed.returncode == 128 + signal.SIGTERM, killed.stderr
    assert "interrupted" in killed.stderr and "Traceback" not in killed.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "something was left behind"
    done = subprocess.run([*COMPRESS, *map(str, args)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "compression.json").is_file()
    assert "Triton is not supported" not in done.stderr  # fla's import-time warning on CPU machines is silenced


def importing_torch(process: subprocess.Popen) -> bool:
    """Whether ``process`` has started to load torch's library: the slow part of a command's start-up, after the
    ``compress`` executable has taken over Ctrl-C (a loaded machine can take longer than any fixed delay)."""
    maps = Path(f"/proc/{process.pid}/maps")
    return maps.is_file() and "libtorch" in maps.read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the process's memory map (Linux)")
@pytest.mark.skipif(signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
                    reason="these tests run with SIGINT ignored (a background job of a script), as compress then "
                           "keeps it")
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path):
    """The signal lands while torch loads; it takes effect once no import runs, which on a loaded machine can be after
    the weights' progress bar has started (a bar is not an error line)."""
    interrupted = run_until(["prune", FIXTURE, "--dry-run"], importing_torch, signal.SIGINT, tmp_path)
    assert interrupted.returncode == 130, interrupted.stderr
    assert "Traceback" not in interrupted.stderr
    progress = re.compile(r"\d+%\|")
    assert [line for line in interrupted.stderr.splitlines() if line.strip() and not progress.search(line)] == [
        "compress: interrupted (SIGINT); nothing half-written was left."
    ]


def test_an_interrupt_that_a_library_turned_into_another_error_is_still_one_line(monkeypatch, capsys):
    """A signal landing inside a half-done import can surface as another error (numpy's lazy attributes gave a
    RecursionError): the exit is still the interrupt's."""
    from compressor import cli, interrupts

    def interrupted_then_broken(**_):
        try:
            interrupts.interrupt(signal.SIGTERM, None)
        except KeyboardInterrupt:
            raise RecursionError("maximum recursion depth exceeded") from None

    monkeypatch.setattr(interrupts, "received", [])
    monkeypatch.setattr(cli, "main", interrupted_then_broken)
    monkeypatch.setattr(signal, "signal", lambda *_: None)
    with pytest.raises(SystemExit) as exit:
        cli.run()
    assert exit.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip() == "compress: interrupted (SIGTERM); nothing half-written was left."


def interrupt_inside_an_import(tmp_path, name: str) -> None:
    """Call ``interrupts.interrupt(SIGTERM, frame)`` from the top level of a module being imported."""
    (tmp_path / f"{name}.py").write_text("import signal, sys\nfrom compressor import interrupts\n"
                                         "interrupts.interrupt(signal.SIGTERM, sys._getframe())\n")
    sys.path.insert(0, str(tmp_path))
    try:
        importlib.import_module(name)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


def test_a_signal_during_an_import_is_delivered_again_after_it(monkeypatch, tmp_path):
    """Raising inside an import can cross C++ frames and abort the process (torch's pybind11 extensions), so the
    handler has the signal delivered again to the main thread, and raises once outside the import; a signal
    repeated while a delivery is pending raises at once."""
    from compressor import interrupts

    timers, sent = [], []
    monkeypatch.setattr(interrupts.threading, "Timer", lambda delay, deliver, args: SimpleNamespace(
        start=lambda: timers.append((delay, deliver, args))))
    monkeypatch.setattr(interrupts.signal, "pthread_kill", lambda thread, signum: sent.append((thread, signum)))
    monkeypatch.setattr(interrupts, "received", [])
    monkeypatch.setattr(interrupts, "deferral", {"armed": False})

    interrupt_inside_an_import(tmp_path, "first_import")  # the handler returned inside the import
    assert timers == [(interrupts.RESEND_SECONDS, interrupts.deliver_again, (signal.SIGTERM,))]
    assert interrupts.received == []
    with pytest.raises(interrupts.Interrupted):  # the user repeated it before the delivery: at once
        interrupt_inside_an_import(tmp_path, "second_import")
    timers[0][1](*timers[0][2])  # the delivery, to the main thread
    assert sent == [(threading.main_thread().ident, signal.SIGTERM)] and not interrupts.deferral["armed"]
    interrupt_inside_an_import(tmp_path, "third_import")  # deferred again
    assert len(timers) == 2
    with pytest.raises(interrupts.Interrupted):  # outside any import
        interrupts.interrupt(signal.SIGTERM, sys._getframe())
    assert interrupts.received == [signal.SIGTERM] * 2 and len(timers) == 2


def test_a_signal_during_a_finaliser_is_delivered_again_after_it(monkeypatch):
    """Python prints and drops an exception raised in a ``__del__`` (garbage collection can run one at any moment,
    as regex's did during a start-up in CI), so the handler has the signal delivered again instead of raising it."""
    from compressor import interrupts

    timers = []
    monkeypatch.setattr(interrupts.threading, "Timer", lambda delay, deliver, args: SimpleNamespace(
        start=lambda: timers.append((delay, deliver, args))))
    monkeypatch.setattr(interrupts, "received", [])
    monkeypatch.setattr(interrupts, "deferral", {"armed": False})

    class Finalised:
        def __del__(self):
            interrupts.interrupt(signal.SIGINT, sys._getframe())

    Finalised()  # dropped at once: its __del__ runs the handler
    assert timers == [(interrupts.RESEND_SECONDS, interrupts.deliver_again, (signal.SIGINT,))]
    assert interrupts.received == []


@pytest.mark.parametrize("surfaces_as", ["the interrupt", "another error"])
def test_an_interrupt_while_the_command_line_is_imported_is_one_line(monkeypatch, capsys, surfaces_as):
    """The executable installs the handlers before it imports the command line: an interrupt then is the interrupt's
    line and exit status too, also where the half-done import turned it into another error."""
    from compressor import __main__ as executable
    from compressor import interrupts

    installed, handlers_when_imported = [], []
    monkeypatch.setattr(interrupts, "received", [])

    class InterruptedImport:
        def find_spec(self, name, path=None, target=None):
            if name == "compressor.cli":
                handlers_when_imported.extend(installed)
                try:
                    interrupts.interrupt(signal.SIGINT, None)
                except KeyboardInterrupt:
                    if surfaces_as == "the interrupt":
                        raise
                    raise RecursionError("maximum recursion depth exceeded") from None

    monkeypatch.setattr(signal, "getsignal", lambda signum: signal.SIG_DFL)
    monkeypatch.setattr(signal, "signal", lambda signum, handler: installed.append((signum, handler)))
    monkeypatch.delitem(sys.modules, "compressor.cli", raising=False)
    monkeypatch.setattr(sys, "meta_path", [InterruptedImport(), *sys.meta_path])
    with pytest.raises(SystemExit) as exit:
        executable.run()
    assert handlers_when_imported == [(signal.SIGINT, interrupts.interrupt), (signal.SIGTERM, interrupts.interrupt)]
    assert exit.value.code == 128 + signal.SIGINT
    assert capsys.readouterr().err.strip() == "compress: interrupted (SIGINT); nothing half-written was left."


def test_an_unreachable_hub_fails_fast_in_one_sentence(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    started = time.monotonic()
    result = invoke("prune", "nobody/no-such-model", "--dry-run", *FAST)
    assert_user_error(result, "cannot be reached", "HF_HUB_OFFLINE=1")
    assert time.monotonic() - started < 10


def test_analyze_with_out_calibrates_once(tmp_path, monkeypatch):
    import compressor.pipeline

    calls = []
    collect = compressor.pipeline.collect_state_statistics
    monkeypatch.setattr(compressor.pipeline, "collect_state_statistics",
                        lambda *a, **k: calls.append(k.get("halves")) or collect(*a, **k))
    result = invoke("analyze", FIXTURE, "--out", tmp_path / "stats", "--samples", "2", "--seq-len", "128")
    assert result.exit_code == 0, result.output
    assert calls == [True]
    assert '"halves"' in (tmp_path / "stats" / "report.json").read_text()


def test_halves_from_one_pass_equal_calibrating_each_half(fixture_model_path):
    from compressor.calibration import collect_state_statistics
    from compressor.loading import load_model

    loaded = load_model(str(fixture_model_path), "cpu")
    tokens = __import__("torch").randint(3, 8000, (4, 128), generator=__import__("torch").Generator().manual_seed(0))
    both = collect_state_statistics(loaded.model, loaded.family, tokens, 2, progress=False, halves=True)
    for half, windows in zip(both.halves, (tokens[:2], tokens[2:])):
        alone = collect_state_statistics(loaded.model, loaded.family, windows, 2, progress=False)
        for name in alone.mean:
            assert half.mean[name].nan_to_num().equal(alone.mean[name].nan_to_num()), name
            assert half.std[name].nan_to_num().equal(alone.std[name].nan_to_num()), name
    whole = collect_state_statistics(loaded.model, loaded.family, tokens, 2, progress=False)
    for name in whole.mean:
        assert both.mean[name].nan_to_num().allclose(whole.mean[name].nan_to_num(), rtol=1e-6, atol=1e-6), name


def test_a_foreign_file_inside_an_output_subfolder_is_refused(tmp_path):
    out = tmp_path / "pruned"
    assert invoke("prune", FIXTURE, "--out", out, *FAST).exit_code == 0
    (out / "figures" / "my-notes.md").write_text("mine\n")
    assert_user_error(invoke("prune", FIXTURE, "--out", out, "--overwrite", *FAST), "figures/my-notes.md")
    assert (out / "figures" / "my-notes.md").read_text() == "mine\n"


def test_an_output_written_before_the_marker_is_replaced_but_not_with_foreign_files(tmp_path):
    out = tmp_path / "old"
    (out / "figures").mkdir(parents=True)
    for name in ("config.json", "compression.json", "model.safetensors", "figures/removed_heads.png"):
        (out / name).write_text("old")
    assert check_output_folder(out, overwrite=True) is None
    (out / "figures" / "notes.txt").write_text("mine")
    with pytest.raises(CompressorError, match="figures/notes.txt"):
        check_output_folder(out, overwrite=True)


def test_a_run_killed_mid_swap_gets_its_previous_output_back(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    aside = tmp_path / ".out.old-0123abcd"
    aside.mkdir()
    (aside / "report.json").write_text("{}")
    (aside / MARKER).write_text(f'{{"written_by": "compressor", "state": "aside", "pid": {int(dead.stdout)}, '
                                '"files": ["report.json"]}')
    assert remove_stale_staging(tmp_path / "out") == []
    assert (tmp_path / "out" / "report.json").read_text() == "{}" and not aside.exists()
    assert "locked" not in json.loads((tmp_path / "out" / MARKER).read_text())  # this run holds no lock on it


def test_a_failed_write_creates_no_parent_folders(tmp_path, no_model_load):
    result = invoke("prune", FIXTURE, "--out", tmp_path / "a" / "b" / "out", "--calib", tmp_path / "missing.txt")
    assert_user_error(result, "missing.txt")
    assert not (tmp_path / "a").exists()


def test_damaged_statistics_are_named_in_one_sentence(tmp_path):
    (tmp_path / "stats").mkdir()
    (tmp_path / "stats" / "stats.safetensors").write_bytes(b"\x00" * 16)
    result = invoke("prune", FIXTURE, "--method", "norm", "--stats", tmp_path / "stats", "--dry-run")
    assert_user_error(result, "stats.safetensors", "damaged")


def test_an_output_in_folders_that_do_not_exist_yet_is_written(tmp_path):
    out = tmp_path / "runs" / "today" / "pruned"
    result = invoke("prune", FIXTURE, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    assert (out / "compression.json").is_file()


def test_signals_the_parent_ignores_stay_ignored(monkeypatch):
    """A background job of a script inherits SIGINT ignored: the handler is installed for SIGTERM only."""
    from compressor import cli, interrupts

    installed = []
    monkeypatch.setattr(signal, "getsignal", lambda signum: signal.SIG_IGN if signum == signal.SIGINT else None)
    monkeypatch.setattr(signal, "signal", lambda signum, handler: installed.append((signum, handler)))
    monkeypatch.setattr(cli, "main", lambda **_: 0)
    with pytest.raises(SystemExit) as exit:
        cli.run()
    assert exit.value.code == 0 and installed == [(signal.SIGTERM, interrupts.interrupt)]
