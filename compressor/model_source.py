"""Where a model comes from, a local folder or a Hub id, checked in one sentence before anything heavy is imported
or loaded."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from .errors import CompressorError


def locate_model(name: str) -> Path | None:
    """The local folder of ``name``, or None for a Hub id that can be fetched (or is cached); a folder without
    ``config.json``, a path that does not exist, or an unreachable Hub fails in one sentence."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CompressorError(f"{path} is a file; give the model's folder (the one holding config.json).")
        if not (path / "config.json").is_file():
            raise CompressorError(f"{path} is not a model folder: it has no config.json.")
        return path
    if looks_like_hub_id(name):
        try:
            check_hub_reachable(name)
        except CompressorError as error:
            if not path.parent.is_dir():
                raise
            raise CompressorError(f"model folder {name} does not exist; read as a Hub id, {error}") from None
        return None
    raise CompressorError(f"model folder {name} does not exist (and is not a Hub id of the form owner/name).")


def local_folder_of(name: str) -> Path | None:
    """``name`` as a local path when it exists, else None (a Hub id, or a mistake ``locate_model`` explains)."""
    path = Path(name).expanduser()
    return path if path.exists() else None


def looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def check_hub_reachable(repo_id: str, timeout: float = 3.0) -> None:
    """Fail fast, in one sentence, when ``repo_id`` must come from a Hub that cannot be reached and is not cached
    (huggingface_hub would otherwise retry for half a minute). With ``HF_HUB_OFFLINE=1`` only the cache is read."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    if constants.HF_HUB_OFFLINE:
        if not cached:
            raise CompressorError(f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                                  "download it on a connected machine or give a local folder.")
        return
    host = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((host.hostname, host.port or 443), timeout=timeout).close()
    except OSError:
        if not cached:
            raise CompressorError(
                f"the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached and {repo_id} is not in the local "
                "cache; give a local model folder, or download it on a connected machine (then HF_HUB_OFFLINE=1 "
                "reads the cache without trying the network)."
            ) from None
        os.environ["HF_HUB_OFFLINE"] = "1"  # the cached copy, without half a minute of retries
        constants.HF_HUB_OFFLINE = True
