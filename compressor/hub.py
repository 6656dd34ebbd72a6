"""Upload an output folder of ``compress prune`` to the Hugging Face Hub.

The token is the ``token`` argument, else ``HF_TOKEN``, else the saved login (huggingface_hub resolves the
last two itself). It is only ever sent in the Authorization header: never printed, logged or written.
"""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

from huggingface_hub import CommitOperationDelete, HfApi
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .errors import CompressorError
from .outputs import MARKER
from .record import FILE, CompressionRecord

try:  # huggingface_hub 2.x speaks HTTP through httpx2, 1.x through httpx
    from httpx2 import HTTPError as _HTTPError
except ImportError:
    from httpx import HTTPError as _HTTPError

STALE_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]  # shards of an earlier push that may be gone now
LARGE_FOLDER_BYTES = 50 * 10**9


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    unverified: bool = False,
    replace: bool = False,
    commit_message: str | None = None,
) -> str:
    """Upload ``folder`` to the model repo ``repo_id`` (created if missing) and return the commit URL.

    The upload is one commit that also deletes remote ``*.safetensors`` shards and indexes the folder no
    longer has. With ``create_pr`` the commit goes to a new pull request and its URL is returned instead.
    ``private`` only applies when the repo is created; without it the owner's default visibility applies.
    Refused: a folder without ``compression.json`` or whose reload check did not pass (unless ``unverified``), and
    a repo (at ``revision``) that holds files but no ``compression.json``, another model whose files the push would
    replace or delete (unless ``replace``).

    With huggingface_hub 1.x a folder over 50 GB goes through ``upload_large_folder`` (resumable, several
    commits), which cannot open a pull request; huggingface_hub 2.x streams large folders in ``upload_folder``.
    """
    folder = Path(folder)
    record = _checked_record(folder, unverified)
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise CompressorError(f"{repo_id!r} is not a valid Hub repo id (expected owner/name).") from None
    message = commit_message or _commit_message(record)
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private or None, exist_ok=True, repo_type="model")
        _check_remote(api, repo_id, revision, replace)
        if hasattr(api, "upload_large_folder") and _size(folder) > LARGE_FOLDER_BYTES:
            return _upload_large(api, folder, repo_id, revision=revision, create_pr=create_pr, message=message)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            revision=revision,
            create_pr=create_pr,
            commit_message=message,
            delete_patterns=STALE_PATTERNS,
            ignore_patterns=[MARKER, f"{MARKER}.partial-*"],
        )
    except HfHubHTTPError as err:
        raise CompressorError(_http_error_message(err, repo_id)) from err
    except OfflineModeIsEnabled as err:
        raise CompressorError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set; unset it to upload.") from err
    except (_HTTPError, ConnectionError) as err:
        raise CompressorError(
            f"could not reach the Hub at {api.endpoint} to push {repo_id} ({type(err).__name__}); check the network."
        ) from err
    except ValueError as err:  # raised by huggingface_hub before uploading, e.g. invalid README metadata
        raise CompressorError(f"cannot push {folder} to {repo_id}: {' '.join(str(err).split())}") from err
    return info.pr_url or info.commit_url


def push_written(folder: Path, repo_id: str, private: bool = False) -> str:
    """``push_folder`` of a folder this run has just written (``--push-to-hub``): a refused or failed push says
    that the folder stays written and how to push it later."""
    try:
        return push_folder(folder, repo_id, private=private)
    except CompressorError as error:
        raise CompressorError(f"wrote {folder}, but the push failed: {str(error).rstrip('.')}; push it later with "
                              f"`compress push {folder} {repo_id}`.") from error


def _checked_record(folder: Path, unverified: bool) -> CompressionRecord | None:
    """The folder's compression.json record; refuse folders that did not come from a verified prune, unless
    ``unverified``."""
    if not folder.is_dir():
        raise CompressorError(f"cannot push {folder}: it is not a folder.")
    record, problem = None, None
    if not (folder / FILE).is_file():
        problem = f"it has no {FILE}, so it did not come from `compress prune`"
    else:
        try:
            record = CompressionRecord.read(folder)
        except CompressorError as error:
            problem = f"its {FILE} is not a compression record ({str(error).rstrip('.')})"
    if problem is None and not (record.verify is not None and record.verify.passed):
        problem = f"its reload check did not pass or never ran (verify.passed in {FILE})"
    if problem is not None and not unverified:
        raise CompressorError(f"refusing to push {folder}: {problem}; use --unverified to push it anyway.")
    return record


def _check_remote(api: HfApi, repo_id: str, revision: str | None, replace: bool) -> None:
    """Refuse, unless ``replace``, a repo whose files compressor did not push: it holds more than ``.gitattributes``
    and no ``compression.json``. (A branch the Hub does not know fails here as the upload would.)"""
    if replace:
        return
    files = api.list_repo_files(repo_id, revision=revision)
    foreign = [path for path in files if path != ".gitattributes"]
    if foreign and FILE not in files:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise CompressorError(f"refusing to push to {repo_id}: it holds {shown} but no {FILE}, so compressor did not "
                              "push them; push to a new repo id, or use --replace to replace them.")


def _commit_message(record: CompressionRecord | None) -> str:
    """E.g. ``Upload pruned model: 12/32 linear-attention heads removed (joint, remove high)``."""
    if record is None:
        return "Upload model folder with compressor"
    total = sum(layer.heads_before for layer in record.layers.values())
    removed = total - sum(len(layer.kept_heads) for layer in record.layers.values())
    return (f"Upload pruned model: {removed}/{total} linear-attention heads removed "
            f"({record.method.chosen or record.method.name}, remove {record.method.remove})")


def _size(folder: Path) -> int:
    """Total bytes of the files under ``folder``."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _upload_large(api: HfApi, folder: Path, repo_id: str, *, revision, create_pr: bool, message: str) -> str:
    """huggingface_hub 1.x, folders over 50 GB: ``upload_large_folder``, then one commit removing stale shards."""
    if create_pr:
        raise CompressorError(
            f"cannot open a pull request on {repo_id}: folders over 50 GB go through huggingface_hub's "
            "upload_large_folder, which cannot; push to a branch with --revision or upgrade huggingface_hub to 2.x."
        )
    api.upload_large_folder(repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision,
                             ignore_patterns=[MARKER, f"{MARKER}.partial-*"])
    stale = [
        CommitOperationDelete(path_in_repo=path)
        for path in api.list_repo_files(repo_id, revision=revision)
        if any(fnmatch(path, pattern) for pattern in STALE_PATTERNS) and not (folder / path).is_file()
    ]
    if stale:
        info = api.create_commit(repo_id, stale, commit_message=f"{message}: remove stale shards", revision=revision)
        return info.commit_url
    return f"{api.endpoint}/{repo_id}/tree/{revision or 'main'}"


def _http_error_message(err: HfHubHTTPError, repo_id: str) -> str:
    """One sentence for an error answer of the Hub (never echoes the token)."""
    status = err.response.status_code
    if status in (401, 403):
        return (
            f"The Hub refused access to {repo_id} (HTTP {status}): the token is missing or invalid, or lacks write "
            f"access to {repo_id}; log in with `hf auth login`, set HF_TOKEN, or pass --token."
        )
    detail = (err.server_message or "").strip().splitlines()
    return f"The Hub refused the push to {repo_id} (HTTP {status}){': ' + detail[0] if detail else ''}."
