"""Calibration text: a source (the embedded text, a file or folder, JSON Lines, a Hub dataset, literal text) ->
documents -> token windows [samples, seq_len]. Reading and checking a source imports no torch (the command line
checks the source before its heavy imports); cutting windows does."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CompressorError
from .settings import PACKINGS, CalibrationSettings

if TYPE_CHECKING:
    import torch

EMBEDDED_CALIBRATION = "python-docs-calib.txt"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl",)
DATASET_PREFIX = "hf:"
LITERAL_PREFIX = "text:"
MAX_CONTROL_SHARE = 0.01
"""A file with more control characters than this share (not tabs, newlines or form feeds) is not text."""


def read_text(source: str | None, text_field: str = "text", split: str = "train", char_budget: int | None = None
              ) -> tuple[str, str]:
    """(text, description): :func:`read_documents` joined by blank lines (documents packed into one stream)."""
    documents, description = read_documents(source, text_field, split, char_budget)
    return "\n\n".join(documents), description


def read_documents(
    source: str | None, text_field: str = "text", split: str = "train", char_budget: int | None = None
) -> tuple[list[str], str]:
    """(documents, description) from one of the calibration sources:

    - None: the embedded Python-docs text (one document);
    - a text file (one document), or a folder of text files (one document per file, sorted by path);
    - a JSON Lines file (``.jsonl``): one document per line, the string in its ``text_field``;
    - ``hf:DATASET[:CONFIG]``: a Hub dataset's ``split``, column ``text_field``, streamed (needs the
      ``datasets`` extra) until ``char_budget`` characters are read (None: the whole split);
    - ``text:LITERAL``: the literal text after the prefix (one document).

    Files that are not text (NUL bytes, invalid UTF-8, many control characters) are refused.
    """
    if source is None:
        text = resources.files("compressor.data").joinpath(EMBEDDED_CALIBRATION).read_text(encoding="utf-8")
        return [text], f"embedded:{EMBEDDED_CALIBRATION} (Python 3.11 documentation, PSF License)"
    if source.startswith(DATASET_PREFIX):
        return read_dataset(source[len(DATASET_PREFIX):], text_field, split, char_budget)
    if source.startswith(LITERAL_PREFIX):
        return [source[len(LITERAL_PREFIX):]], "literal text"
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() in JSONL_SUFFIXES:
        return read_json_lines(path, text_field), f"{path} (field {text_field!r})"
    if path.is_file():
        documents = [read_text_file(path)]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise CompressorError(f"calibration folder {path} holds no text files ({', '.join(TEXT_SUFFIXES)}).")
        documents = [read_text_file(p) for p in files]
    else:
        raise CompressorError(f"calibration file {source} does not exist (give literal text as text:...).")
    if not any(document.strip() for document in documents):
        raise CompressorError(f"calibration {'file' if path.is_file() else 'folder'} {path} holds no text.")
    return documents, str(path)


def read_text_file(path: Path) -> str:
    """The UTF-8 text of ``path``; a file that is not text (an executable, an archive, a model) is refused."""
    data = path.read_bytes()
    if b"\0" in data:
        raise CompressorError(f"{path} is not a text file: it holds NUL bytes.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CompressorError(f"{path} is not UTF-8 text (byte {error.start} cannot be decoded).") from None
    control = sum(1 for c in text if ord(c) < 32 and c not in "\t\n\r\f\v")
    if control > MAX_CONTROL_SHARE * max(len(text), 1):
        raise CompressorError(f"{path} is not a text file: {control} of its {len(text)} characters are control "
                              "characters.")
    return text


def check_source(source: str | None, text_field: str = "text") -> None:
    """Fail early (before a model loads) on a calibration source that cannot be read: a missing file, a bad
    JSON Lines file, an empty folder, or a Hub dataset without the ``datasets`` extra (not streamed here)."""
    if source is not None and source.startswith(DATASET_PREFIX):
        import_datasets(source[len(DATASET_PREFIX):])
    else:
        read_documents(source, text_field)


def import_datasets(name: str):
    """The ``datasets`` module, or a CompressorError saying how to install it."""
    try:
        import datasets
    except ImportError:
        raise CompressorError(
            f"reading the Hub dataset {name} needs the datasets extra: pip install 'compressor[datasets]'."
        ) from None
    return datasets

def read_json_lines(path: Path, text_field: str) -> list[str]:
    """The string in ``text_field`` of every non-empty line of the JSON Lines file ``path``."""
    documents = []
    for number, line in enumerate(read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise CompressorError(f"line {number} of {path} is not valid JSON.") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise CompressorError(
                f"line {number} of {path} has no string field {text_field!r}; name the field with --text-field."
            )
        documents.append(record[text_field])
    if not documents:
        raise CompressorError(f"{path} holds no JSON lines.")
    return documents


def read_dataset(name: str, column: str, split: str, char_budget: int | None) -> tuple[list[str], str]:
    """Stream ``column`` of the Hub dataset ``name`` (``ID`` or ``ID:CONFIG``), ``split``, until ``char_budget``
    characters are read: (documents, description)."""
    datasets = import_datasets(name)
    repo, _, config = name.partition(":")
    documents, read = [], 0
    try:
        rows = datasets.load_dataset(repo, config or None, split=split, streaming=True)
        for row in rows:
            if not isinstance(row.get(column), str):
                raise CompressorError(
                    f"the dataset {name} (split {split}) has no text column {column!r}; name it with --text-field."
                )
            documents.append(row[column])
            read += len(row[column])
            if char_budget is not None and read >= char_budget:
                break
    except CompressorError:
        raise
    except Exception as error:  # offline, unknown id, unknown split or config: datasets raises many kinds
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CompressorError(
            f"could not stream the Hub dataset {name} (split {split}): {reason.rstrip('.')}."
        ) from None
    if not documents:
        raise CompressorError(f"the dataset {name} (split {split}) has no rows.")
    return documents, f"hf:{name} (split {split}, column {column!r})"


def calibration_windows(settings: CalibrationSettings, tokenizer) -> tuple[torch.Tensor, str]:
    """(calibration windows [samples, seq_len], description of the source)."""
    documents, source = read_documents(settings.calib, settings.text_field, settings.split,
                                       16 * settings.samples * settings.seq_len)
    tokens = token_windows(tokenizer, documents, settings.samples, settings.seq_len, settings.seed,
                           packing=settings.packing)
    return tokens, source


def token_windows(
    tokenizer,
    text: str | list[str],
    samples: int | None,
    seq_len: int,
    seed: int,
    option: str = "--samples",
    packing: str = "pack",
) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens chosen with ``seed`` (None: every window, in order):
    LongTensor [samples, seq_len]. ``option`` names the option to lower in the error message.

    ``text`` is one text or a list of documents. ``packing='pack'`` joins the documents with blank lines and cuts
    the stream into non-overlapping windows (a window may span two documents); ``packing='truncate'`` gives
    every document its own window, its first ``seq_len`` tokens, and skips documents shorter than that (no
    padding: pad tokens would enter the states).
    """
    if packing not in PACKINGS:
        raise CompressorError(f"--packing must be one of {', '.join(PACKINGS)}, got '{packing}'.")
    import torch

    documents = [text] if isinstance(text, str) else list(text)
    length_option = option.replace("samples", "seq-len")
    if packing == "truncate":
        encoded = tokenizer(documents, add_special_tokens=False, verbose=False)["input_ids"]
        windows = [ids[:seq_len] for ids in encoded if len(ids) >= seq_len]
        if samples is None:
            samples = len(windows)
        if len(windows) < max(samples, 1):
            raise CompressorError(
                f"{len(windows)} of {len(documents)} documents have at least {seq_len} tokens, but "
                f"{max(samples, 1)} samples were asked (--packing truncate skips shorter documents); lower {option} "
                f"or {length_option}, give more documents, or use --packing pack."
            )
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(len(windows), generator=generator)[:samples].sort().values
        return torch.tensor([windows[i] for i in chosen.tolist()], dtype=torch.long)
    ids = tokenizer("\n\n".join(documents), add_special_tokens=False, verbose=False)["input_ids"]
    available = len(ids) // seq_len
    every = samples is None
    if every:
        samples = available
    if available < max(samples, 1):
        asked = "" if every else f" but {samples:,} were asked"
        raise CompressorError(
            f"the text has {len(ids):,} tokens, enough for {available:,} samples of {seq_len:,} tokens{asked}; lower "
            f"{length_option if every else f'{option} or {length_option}'}, or give more text."
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randperm(available, generator=generator)[:samples].sort().values * seq_len
    ids = torch.tensor(ids, dtype=torch.long)
    return torch.stack([ids[start : start + seq_len] for start in starts.tolist()])
