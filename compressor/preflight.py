"""What the commands refuse before a model loads, with light imports only: the command line runs it before it
imports the pipeline (torch, fla, every family's modeling code), so that a mistake is refused in a second or
two."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .calibration_text import check_source
from .errors import CompressorError
from .outputs import check_output
from .settings import EvalSettings, PruneSettings


def check_prune_inputs(source: Path | None, out_dir: Path | None, settings: PruneSettings):
    """Check the options, the calibration source (when the text is read), ``out_dir`` (free or an earlier output,
    not the source, writable; checked on a dry run too, which then says what the run would refuse) and that
    streaming has a local folder to read; ``source``: the model's local folder, None for a Hub id. Returns the
    options' budget."""
    budget = settings.check(out_dir)
    if settings.reads_calibration_text:
        check_source(settings.calibration.calib, settings.calibration.text_field)
    if out_dir is not None:
        check_output(out_dir, settings.overwrite, [source], dry_run=settings.dry_run)
        if settings.export == "stream" and source is None:
            raise CompressorError("--export stream reads the source's safetensors files and needs a local model "
                                  "folder; download the model first or use --export memory.")
    return budget


EVAL_WRITER = "compress eval"
"""The ``written_by`` field of the figures file ``compress eval --json`` writes: ``--overwrite`` replaces only those."""


def written_by_eval(path: Path) -> bool:
    """Whether ``path`` is a figures file that ``compress eval`` wrote (a JSON object naming it in ``written_by``)."""
    try:
        figures = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(figures, dict) and figures.get("written_by") == EVAL_WRITER


def check_json_replaceable(json_path: Path, overwrite: bool) -> None:
    """Refuse an existing ``json_path`` unless ``overwrite`` and ``compress eval`` wrote it; refuse a link (the
    figures would replace the link, not its target)."""
    if json_path.is_symlink():
        raise CompressorError(f"--json {json_path} is a symbolic link; give the path of a file to write.")
    if not json_path.exists():
        return
    if not (json_path.is_file() and written_by_eval(json_path)):
        raise CompressorError(f"--json {json_path} already exists and compress eval did not write it; choose "
                              "another path.")
    if not overwrite:
        raise CompressorError(f"--json {json_path} already exists; pass --overwrite to replace the file.")


def check_eval_inputs(settings: EvalSettings, json_path: str | Path | None, overwrite: bool) -> None:
    """Check the evaluation options, and that ``json_path`` (if any) can be written: its folder exists and takes a
    file, and it is not there yet, or (with ``overwrite``) is an earlier figures file of ``compress eval``."""
    settings.check()
    if json_path is None:
        return
    json_path = Path(json_path).expanduser()
    folder = json_path.resolve().parent
    if not folder.is_dir():
        raise CompressorError(f"the folder of --json {json_path} does not exist.")
    if json_path.is_dir():
        raise CompressorError(f"--json {json_path} is a folder; give the path of a file to write.")
    check_json_replaceable(json_path, overwrite)
    try:  # a folder that cannot be written fails now, not after the evaluation; nothing stays
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{json_path.name}."):
            pass
    except OSError as error:
        raise CompressorError(f"cannot write --json {json_path}: {error.strerror or error}.") from None


def check_pruned_folder(pruned_dir: Path) -> None:
    """Refuse, in one sentence, a ``heal`` input that is not a folder ``compress prune`` wrote."""
    if not pruned_dir.is_dir():
        raise CompressorError(f"pruned folder {pruned_dir} does not exist.")
    if not (pruned_dir / "config.json").is_file():
        raise CompressorError(f"{pruned_dir} is not a model folder: it has no config.json.")
    if not (pruned_dir / "compression.json").is_file():
        raise CompressorError(f"{pruned_dir} was not written by compressor (it has no compression.json); "
                              "heal takes the output folder of `compress prune`.")


def check_teacher_location(teacher: str, pruned_dir: Path) -> None:
    """Refuse, in one sentence, a ``heal`` teacher that is neither a model folder nor a Hub id, or is the pruned
    folder itself."""
    path = Path(teacher).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise CompressorError(f"teacher {teacher} is not a model folder: it has no config.json.")
    if not path.exists() and (teacher.count("/") != 1 or teacher.startswith((".", "/", "~"))):
        raise CompressorError(f"teacher folder {teacher} does not exist (and is not a Hub id of the form owner/name).")
    if path.exists() and path.resolve() == pruned_dir.resolve():
        raise CompressorError("the teacher is the pruned folder itself; give the unpruned source model.")
