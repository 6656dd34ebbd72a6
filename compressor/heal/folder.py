"""The healed folder: the pruned folder's files with the healed weights, its record and card, staged and
swapped in."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from .settings import HealSettings

if TYPE_CHECKING:
    from .run import Outcome

WEIGHT_FILES = re.compile(r".*\.safetensors(\.index\.json)?$|.*\.bin$|.*\.bin\.index\.json$")


def _card_figures(pruned_dir: Path) -> list[str]:
    """Figure paths the pruned folder's card shows, in its order, that exist."""
    card = pruned_dir / "README.md"
    if not card.is_file():
        return []
    found = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", card.read_text())
    return [path for path in dict.fromkeys(found) if not Path(path).is_absolute() and (pruned_dir / path).is_file()]


def _card_command(pruned_dir: Path) -> str | None:
    """The command of the pruned folder's card (its "Reproduce" block)."""
    card = pruned_dir / "README.md"
    if not card.is_file():
        return None
    match = re.search(r"## Reproduce\s+```bash\n(.*?)\n```", card.read_text(), re.S)
    return match.group(1) if match else None


def write_folder(model, pruned_dir: Path, staging: Path, save_dtype) -> None:
    """Write the healed weights into ``staging`` beside every other file that compressor wrote in ``pruned_dir``
    (config, shipped code, tokenizer, figures; a user's own additions stay behind), unchanged; ``README.md`` and
    ``compression.json`` are left to the caller."""
    import torch

    from ..outputs import MARKER, written_paths

    marker = pruned_dir / MARKER
    listed = json.loads(marker.read_text())["files"] if marker.is_file() else written_paths(pruned_dir)
    for relative in listed:
        parts = PurePosixPath(relative).parts
        if not parts or PurePosixPath(relative).is_absolute() or ".." in parts:
            continue  # a marker naming a place outside the folder is not one compressor wrote
        name = parts[0]
        if name in ("README.md", "compression.json") or WEIGHT_FILES.match(name) or name.startswith("."):
            continue
        if (pruned_dir / relative).is_file():
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(pruned_dir / relative, staging / relative)
    for parameter in model.parameters():
        if parameter.is_floating_point():
            parameter.data = parameter.data.to(save_dtype)
    with tempfile.TemporaryDirectory(dir=staging, prefix=".heal-weights-") as weights:  # goes with the staging
        model.save_pretrained(weights)
        for item in Path(weights).iterdir():
            if WEIGHT_FILES.match(item.name):
                shutil.move(str(item), staging / item.name)
    for parameter in model.parameters():
        if parameter.is_floating_point():
            parameter.data = parameter.data.to(torch.float32)


def write_healed(healed, outcome: Outcome, pruned_dir: Path, out_dir: Path, settings: HealSettings,
                 overwrite: bool, sources: list, command: str | None, started: float) -> None:
    """The output folder: the pruned folder's files with the healed weights, the reload check, the record and
    the card, staged and swapped in (``compressor.outputs``)."""
    from ..card import render_card
    from ..export import verify_folder, verification_tokens
    from ..outputs import check_free_space, staging_folder

    weights = sum(p.numel() for p in outcome.student.parameters()) * outcome.save_dtype.itemsize
    check_free_space(out_dir, weights + 2**26)
    with staging_folder(out_dir, overwrite, "heal", sources) as staging:
        write_folder(outcome.student, pruned_dir, staging, outcome.save_dtype)
        if settings.verify:
            check = verify_folder(outcome.student, staging, verification_tokens(outcome.student.config, (2, 128)))
            healed.verify = check
        healed.recovery["wall_seconds"] = round(time.perf_counter() - started, 2)
        healed.write(staging)
        commands = list(dict.fromkeys(c for c in (_card_command(pruned_dir), command) if c))
        (staging / "README.md").write_text(render_card(healed, command="\n".join(commands) or None,
                                                       figures=_card_figures(pruned_dir)))
