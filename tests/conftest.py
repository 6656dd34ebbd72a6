"""Shared paths and helpers of the tests; every path is relative to this file, not to the working directory."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "PYTEST_XDIST_WORKER" in os.environ:  # a worker of `pytest -n N`, set up before torch and transformers load
    # the cores shared out among the workers (and the processes their tests start), not each worker taking all
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    # transformers copies a folder's modeling code into this cache to import it: one cache per worker, no races
    modules = tempfile.mkdtemp(prefix=f"compressor-tests-hf-modules-{os.environ['PYTEST_XDIST_WORKER']}-")
    os.environ.setdefault("HF_MODULES_CACHE", modules)
    atexit.register(shutil.rmtree, modules, ignore_errors=True)
sys.path.insert(0, str(Path(__file__).parent))

from click.testing import CliRunner, Result  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "qwen35-tiny-6m"
DATA = Path(__file__).parent.parent / "compressor" / "data"
EVAL_TEXT = DATA / "python-docs-eval.txt"
CALIB_TEXT = DATA / "python-docs-calib.txt"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test of more than a few seconds (deselect with -m 'not slow')")


@pytest.fixture(scope="session")
def fixture_model_path() -> Path:
    return FIXTURE


def invoke(*args) -> Result:
    """``compress ARGS`` in this process (click's CliRunner), exceptions caught."""
    from compressor.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def assert_user_error(result: Result, *words: str) -> str:
    """Exit status 1 with exactly one ``Error:`` line naming ``words``, no traceback, nothing on stdout."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}\n{result.output}"
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    message = errors[0]
    for word in words:
        assert word in message, message
    assert result.stdout.strip() == "", result.stdout  # no plan or summary printed on failure
    return message


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command gets as far as loading a model."""
    import compressor.pipeline
    import compressor.quality

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(compressor.pipeline, "load_model", refuse)
    monkeypatch.setattr(compressor.quality, "load_model", refuse)


@pytest.fixture
def triton_forbidden(monkeypatch):
    """Make any Triton kernel launch fail loudly."""
    triton = pytest.importorskip("triton")
    import fla  # noqa: F401  (fla must be installed for this check to mean anything)

    def refuse(*args, **kwargs):
        raise AssertionError("a Triton kernel was launched for CPU tensors")

    monkeypatch.setattr(triton.runtime.jit.JITFunction, "run", refuse)
    monkeypatch.setattr(triton.runtime.autotuner.Autotuner, "run", refuse)
