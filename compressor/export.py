"""Write the output folder: weights, config, shipped modeling code, tokenizer, record and card, atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from torch import nn

from .errors import CompressorError
from .families import Family

SHIPPED_HELPERS = ("gated_delta.py", "gated_deltanet.py")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)


def check_output_folder(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing output folder unless ``overwrite``; refuse a file in its place in any case."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CompressorError(f"output path {out_dir} exists and is not a folder.")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise CompressorError(f"output folder {out_dir} already exists; pass --overwrite to replace it.")


@contextmanager
def staging_folder(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; on success it replaces ``out_dir``, on failure it vanishes."""
    check_output_folder(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _default_permissions(staging)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)


def _default_permissions(folder: Path) -> None:
    """Temporary folders and files are private (0700/0600); give the result the user's usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_model(model: nn.Module, family: Family, folder: Path, max_shard_size: str = "2GB") -> list[str]:
    """Save weights (sharded safetensors), config and the modeling code that ``config.auto_map`` names.

    ``save_pretrained`` records the model's own class in ``architectures``; a config with one head count in every
    layer (no ``per_layer_config``) names the stock class instead, which engines such as vLLM look up.
    Returns the names of the modeling files written.
    """
    architectures = model.config.architectures
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    if architectures != model.config.architectures:
        model.config.architectures = architectures
        model.config.save_pretrained(folder)
    shipped = [*SHIPPED_HELPERS, *family.helpers, family.modeling_file]
    package = resources.files("compressor.modeling")
    for name in shipped:
        (folder / name).write_text(package.joinpath(name).read_text())
    return shipped


def copy_tokenizer_files(source: Path | None, folder: Path, save_tokenizer: Callable[[Path], object] | None) -> None:
    """Copy the tokenizer and generation files of a local source; otherwise let the tokenizer save itself."""
    if source is not None and source.is_dir():
        for name in TOKENIZER_FILES:
            if (source / name).is_file() and not (folder / name).exists():
                shutil.copyfile(source / name, folder / name)
    elif save_tokenizer is not None:
        save_tokenizer(folder)


def write_json(path: Path, record: dict) -> None:
    path.write_text(json.dumps(record, indent=2) + "\n")
