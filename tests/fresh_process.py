"""Run a script in a fresh Python process in which ``compressor`` cannot be imported."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

BLOCKER = textwrap.dedent(
    """
    import sys

    class _BlockCompressor:
        def find_spec(self, name, path=None, target=None):
            if name == "compressor" or name.startswith("compressor."):
                raise ImportError("compressor is blocked in this process")

    sys.meta_path.insert(0, _BlockCompressor())
    """
)


def run_without_compressor(script: str, workdir: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``script`` (Python source) with ``compressor`` blocked, in ``workdir``; raise with its output on failure."""
    path = workdir / "fresh_script.py"
    path.write_text(BLOCKER + textwrap.dedent(script))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, str(path)], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"fresh process failed:\n{done.stdout}\n{done.stderr[-4000:]}")
    return done
