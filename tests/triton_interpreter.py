"""Tests that run fla's decode-step kernels on the CPU under Triton's interpreter need one that runs their loops."""

from __future__ import annotations

import pytest


def skip_where_the_interpreter_cannot_run_decode_steps(kernel: str) -> None:
    """Skip the calling test under Triton < 3.9, whose interpreter fails on the token loop of fla's decode-step
    kernels (a loop bounded by a runtime integer; 3.6's fails, 3.9's runs it, 3.7 and 3.8 untried). On a GPU the
    CUDA tests run the kernel itself."""
    triton = pytest.importorskip("triton")
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 9):
        pytest.skip(f"Triton {triton.__version__}'s interpreter fails on the token loop of {kernel}; 3.9's runs it")
