"""push_folder against a loopback fake of the Hub API (127.0.0.1 only; nothing reaches the network).

The fake serves what huggingface_hub's create_repo and upload_folder call: repo creation, README metadata
validation, the recursive file listing (for delete_patterns), preupload (every file "regular", so no LFS or
Xet transfer), the NDJSON commit, and pull-request creation. Both upload paths of huggingface_hub 2.x run:
the Xet-era streamed pipeline (the default when hf_xet is installed) and the legacy create_commit.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import huggingface_hub
import pytest
from huggingface_hub.utils import close_session

import compressor.hub as hub
from compressor.errors import CompressorError
from compressor.hub import push_folder

TOKEN = "hf_dummy_secret"
REPO = "alice/pruned"
OID = "0123456789abcdef0123456789abcdef01234567"
REMOTE_FILES = [  # what an earlier push left: two shards and an index that the new folder no longer has
    ".gitattributes",
    "README.md",
    "compression.json",
    "old-00001-of-00002.safetensors",
    "old-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "model.safetensors",
]
_REPO_PATH = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<op>tree|preupload|commit|discussions)(/(?P<rest>.*))?")

STALE = {"old-00001-of-00002.safetensors", "old-00002-of-00002.safetensors", "model.safetensors.index.json"}
BOTH_PATHS = pytest.mark.parametrize("fake_hub", ["xet", "legacy"], indirect=True)


class FakeHub(ThreadingHTTPServer):
    """A threaded loopback server that records every request and answers like the Hub (or with ``deny``)."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.requests: list[dict] = []
        self.deny: int | None = None  # answer every request with this status
        self.remote_files = list(REMOTE_FILES)  # what the repo holds
        self.missing_branches: set[str] = set()  # branches whose file listing is answered 404

    def of(self, method: str, op: str) -> list[dict]:
        """Recorded requests of one kind (``op`` is a path fragment such as ``/commit/``)."""
        return [r for r in self.requests if r["method"] == method and op in r["path"]]


class _Handler(BaseHTTPRequestHandler):
    timeout = 5  # seconds a connection may stay silent

    def do_GET(self):
        self._answer("GET")

    def do_POST(self):
        self._answer("POST")

    def log_message(self, *args):  # keep test output clean
        pass

    def _answer(self, method: str):
        url = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {key.lower(): value for key, value in self.headers.items()}
        self.server.requests.append(
            {"method": method, "path": url.path, "query": url.query, "headers": headers, "body": body}
        )
        if self.server.deny:
            return self._send(self.server.deny, {"error": "Invalid credentials in Authorization header"})
        status, payload = self._route(method, url.path, body)
        self._send(status, payload)

    def _route(self, method: str, path: str, body: bytes):
        base = self.server.url
        if (method, path) == ("POST", "/api/repos/create"):
            payload = json.loads(body)
            return 200, {"url": f"{base}/{payload['organization']}/{payload['name']}"}
        if (method, path) == ("POST", "/api/validate-yaml"):
            return 200, {"errors": [], "warnings": []}
        match = _REPO_PATH.fullmatch(path)
        if match is None:
            return 404, {"error": f"no route {method} {path}"}
        repo, op = match["repo"], match["op"]
        if method == "GET" and op == "tree" and (match["rest"] or "").split("/")[0] in self.server.missing_branches:
            return 404, {"error": "Invalid rev id"}
        if method == "GET" and op == "tree":
            return 200, [{"type": "file", "path": p, "size": 10, "oid": "1" * 40} for p in self.server.remote_files]
        if method == "POST" and op == "preupload":
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        if method == "POST" and op == "commit":
            return 200, {
                "commitUrl": f"{base}/{repo}/commit/{OID}",
                "commitOid": OID,
                "pullRequestUrl": f"{base}/{repo}/discussions/1",
            }
        if method == "POST" and op == "discussions" and not match["rest"]:
            return 200, {"num": 1}
        if method == "GET" and op == "discussions" and match["rest"] == "1":
            return 200, {
                "title": "pr", "num": 1, "createdAt": "2026-01-01T00:00:00.000Z", "status": "draft",
                "repo": {"name": repo, "type": "model"}, "isPullRequest": True, "events": [],
                "changes": {"base": "refs/heads/main"}, "filesWithConflicts": [],
            }  # fmt: skip
        return 404, {"error": f"no route {method} {path}"}

    def _send(self, status: int, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _dead_url() -> str:
    """A loopback URL that nothing listens on: connecting fails at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(autouse=True)
def hub_env(monkeypatch):
    """huggingface_hub online, with no token, proxy or real Hub in reach.

    The default endpoint points at a dead loopback port, so a call that ignores ``endpoint=`` (such as
    huggingface_hub's best-effort agent registry fetch) fails locally instead of reaching huggingface.co.
    """
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", _dead_url())
    close_session()  # a fresh HTTP client that sees the cleaned environment
    yield
    close_session()


@pytest.fixture
def fake_hub(request, monkeypatch):
    """The fake Hub, on the upload path given by indirect parametrization.

    "xet" (the default) is huggingface_hub 2.x's streamed pipeline, "legacy" its plain create_commit.
    """
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", getattr(request, "param", "xet") == "legacy")
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _record(passed: bool | None = True) -> dict:
    """A complete compression.json of format 1 (what earlier versions wrote; it must still be read)."""
    layer = {"heads_before": 8, "kept_heads": [0, 1, 2, 3, 4], "score": [0.5] * 8, "rank": [3.0] * 8,
             "norm": [1.0] * 8, "key_heads_before": 4, "kept_key_heads": [0, 1, 2], "value_to_key": None}
    record = {
        "format": 1,
        "base_model": "Qwen/Qwen3.5-0.8B",
        "family": "qwen3_5_text",
        "license": None,
        "method": {"name": "joint", "alpha": 0.5, "remove": "high", "budget": "global", "state_reduction": 0.389,
                   "heads_per_layer": None, "protect_layers": [], "min_heads_per_layer": 1, "seed": 0},
        "calibration": {"source": "embedded", "samples": 4, "seq_len": 512, "tokens": 2048, "eps": 1e-4},
        "layers": {str(i): dict(layer) for i in (0, 1, 3, 4)},
        "dtype": {"compute": "float32", "saved": "bfloat16"},
        "state_bytes_before": 65536, "state_bytes_after": 40960, "params_before": 100, "params_after": 90,
        "per_layer_heads": False,
        "versions": {"compressor": "0.1.0"},
    }
    if passed is not None:
        record["verify"] = {"max_abs_logit_diff": 0.0, "passed": passed, "tokens": 512}
    return record


@pytest.fixture
def folder(tmp_path):
    """A tiny output folder: record, config, one fake shard, card."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "compression.json").write_text(json.dumps(_record()))
    (out / "config.json").write_text(json.dumps({"model_type": "qwen3_5_text", "hidden_size": 64}))
    (out / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (out / "README.md").write_text("---\nlibrary_name: transformers\n---\n\n# pruned\n")
    return out


def _commit_lines(request: dict) -> list[dict]:
    return [json.loads(line) for line in request["body"].decode().splitlines()]


def _files_under(path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file())


@BOTH_PATHS
def test_push_creates_repo_and_commits_once(fake_hub, folder, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    url = push_folder(folder, REPO, private=True, token=TOKEN, endpoint=fake_hub.url)

    assert url == f"{fake_hub.url}/{REPO}/commit/{OID}"
    [create] = fake_hub.of("POST", "/api/repos/create")
    payload = json.loads(create["body"])
    assert (payload["organization"], payload["name"], payload["type"]) == ("alice", "pruned", "model")
    assert payload.get("visibility") == "private" or payload.get("private") is True

    [commit] = fake_hub.of("POST", "/commit/")
    assert commit["path"] == f"/api/models/{REPO}/commit/main"
    lines = _commit_lines(commit)
    header = [line["value"] for line in lines if line["key"] == "header"]
    assert header[0]["summary"] == "Upload pruned model: 12/32 linear-attention heads removed (joint, remove high)"
    added = {line["value"]["path"]: line["value"] for line in lines if line["key"] == "file"}
    assert set(added) == {"README.md", "compression.json", "config.json", "model.safetensors"}
    assert base64.b64decode(added["config.json"]["content"]) == (folder / "config.json").read_bytes()
    deleted = {line["value"]["path"] for line in lines if line["key"] == "deletedFile"}
    assert deleted == STALE

    assert fake_hub.requests and all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in fake_hub.requests)
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err + caplog.text
    assert TOKEN.encode() not in _files_under(tmp_path)


def test_push_without_private_or_token_argument(fake_hub, folder, monkeypatch):
    """Visibility is left to the owner's default; the token comes from HF_TOKEN."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    push_folder(folder, REPO, endpoint=fake_hub.url)
    [create] = fake_hub.of("POST", "/api/repos/create")
    payload = json.loads(create["body"])
    assert "visibility" not in payload and "private" not in payload
    assert all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in fake_hub.requests)


@BOTH_PATHS
def test_push_create_pr_returns_pull_request(fake_hub, folder):
    url = push_folder(folder, REPO, create_pr=True, token=TOKEN, endpoint=fake_hub.url)
    assert url == f"{fake_hub.url}/{REPO}/discussions/1"
    [commit] = fake_hub.of("POST", "/commit/")
    assert commit["path"].endswith("/commit/refs%2Fpr%2F1") or "create_pr=1" in commit["query"]


def test_unauthorized_names_repo_not_token(fake_hub, folder, capsys):
    fake_hub.deny = 401
    with pytest.raises(CompressorError) as info:
        push_folder(folder, REPO, token=TOKEN, endpoint=fake_hub.url)
    message = str(info.value)
    assert REPO in message and "401" in message and "write access" in message
    assert TOKEN not in message
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err


def test_unreachable_hub_is_one_sentence(folder):
    with pytest.raises(CompressorError, match="^could not reach the Hub"):
        push_folder(folder, REPO, token=TOKEN, endpoint=_dead_url())


def test_folder_without_record_needs_unverified(fake_hub, folder):
    (folder / "compression.json").unlink()
    with pytest.raises(CompressorError, match="compression.json"):
        push_folder(folder, REPO, token=TOKEN, endpoint=fake_hub.url)
    assert fake_hub.requests == []
    with pytest.raises(CompressorError, match="--unverified"):
        push_folder(folder, REPO, token=TOKEN, endpoint=fake_hub.url, replace=True)
    push_folder(folder, REPO, token=TOKEN, endpoint=fake_hub.url, unverified=True)
    [commit] = fake_hub.of("POST", "/commit/")
    assert _commit_lines(commit)[0]["value"]["summary"] == "Upload model folder with compressor"


@pytest.mark.parametrize("passed", [False, None])
def test_unverified_folder_needs_unverified(fake_hub, folder, passed):
    (folder / "compression.json").write_text(json.dumps(_record(passed)))
    with pytest.raises(CompressorError, match="verify.passed"):
        push_folder(folder, REPO, token=TOKEN, endpoint=fake_hub.url)
    assert fake_hub.requests == []
    push_folder(folder, REPO, token=TOKEN, endpoint=fake_hub.url, unverified=True, commit_message="mine")
    [commit] = fake_hub.of("POST", "/commit/")
    assert _commit_lines(commit)[0]["value"]["summary"] == "mine"


def test_missing_folder_and_bad_repo_id(tmp_path, folder):
    with pytest.raises(CompressorError, match="not a folder"):
        push_folder(tmp_path / "nope", REPO)
    with pytest.raises(CompressorError, match="not a valid Hub repo id"):
        push_folder(folder, "alice/bad//id")


def test_large_folder_on_hub_1x_uses_upload_large_folder(fake_hub, folder, monkeypatch):
    """huggingface_hub 1.x: upload_large_folder, then one commit deleting the shards the folder no longer has."""
    calls = []

    class Hub1xApi(huggingface_hub.HfApi):
        def upload_large_folder(self, **kwargs):
            calls.append(kwargs)

    monkeypatch.setattr(hub, "HfApi", Hub1xApi)
    monkeypatch.setattr(hub, "LARGE_FOLDER_BYTES", 0)
    with pytest.raises(CompressorError, match="pull request"):
        push_folder(folder, REPO, create_pr=True, token=TOKEN, endpoint=fake_hub.url)
    assert calls == []

    url = push_folder(folder, REPO, revision="v2", token=TOKEN, endpoint=fake_hub.url)
    assert url == f"{fake_hub.url}/{REPO}/commit/{OID}"
    assert [(c["repo_id"], c["revision"]) for c in calls] == [(REPO, "v2")]
    [commit] = fake_hub.of("POST", "/commit/")
    assert commit["path"] == f"/api/models/{REPO}/commit/v2"
    deleted = {line["value"]["path"] for line in _commit_lines(commit) if line["key"] == "deletedFile"}
    assert deleted == STALE


@pytest.mark.parametrize("remote", [
    [".gitattributes", "README.md", "config.json", "model.safetensors"],  # another model, e.g. the source's repo
    [".gitattributes", "notes.md"],
])
def test_a_repo_compressor_did_not_push_to_needs_replace(fake_hub, folder, remote):
    """A repo holding files but no compression.json is another model: nothing is committed (no file replaced or
    deleted) without --replace, --unverified included; an empty repo (.gitattributes alone) takes the push."""
    fake_hub.remote_files = remote
    for unverified in (False, True):
        with pytest.raises(CompressorError, match="no compression.json.*--replace"):
            push_folder(folder, REPO, token=TOKEN, endpoint=fake_hub.url, unverified=unverified)
    assert fake_hub.of("POST", "/commit/") == []
    push_folder(folder, REPO, token=TOKEN, endpoint=fake_hub.url, replace=True)
    assert len(fake_hub.of("POST", "/commit/")) == 1
    fake_hub.remote_files = [".gitattributes"]
    push_folder(folder, REPO, token=TOKEN, endpoint=fake_hub.url)
    assert len(fake_hub.of("POST", "/commit/")) == 2


def test_a_branch_the_hub_does_not_know_is_one_sentence(fake_hub, folder):
    """The remote check lists the files of --revision: a branch the Hub does not know gets the Hub's answer in one
    sentence, and nothing is committed; the check reads that branch, not main (which holds another model)."""
    fake_hub.remote_files = [".gitattributes", "model.safetensors"]  # another model on main
    fake_hub.missing_branches = {"fresh"}
    with pytest.raises(CompressorError, match=r"^The Hub refused the push to alice/pruned \(HTTP 404\)"):
        push_folder(folder, REPO, revision="fresh", token=TOKEN, endpoint=fake_hub.url)
    assert fake_hub.of("POST", "/commit/") == []
    with pytest.raises(CompressorError, match="no compression.json"):
        push_folder(folder, REPO, token=TOKEN, endpoint=fake_hub.url)


def test_a_failed_push_after_writing_says_the_folder_stays(folder, monkeypatch):
    """prune --push-to-hub: the folder is written before the push; a push that fails says so and how to retry."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CompressorError) as info:
        hub.push_written(folder, REPO)
    message = str(info.value)
    assert message.startswith(f"wrote {folder}, but the push failed: cannot push to {REPO}: HF_HUB_OFFLINE")
    assert message.endswith(f"push it later with `compress push {folder} {REPO}`.") and message.count(". ") == 0
    assert (folder / "compression.json").is_file()
