"""Tests that run fla's kernels on the CPU under Triton's interpreter: which Triton's interpreter runs their loops, and
the preamble a script needs to run fla's chunked kernels there."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHUNKED_KERNELS = """
import builtins
import sys

import triton.language as tl
from triton.runtime import autotuner

# Without a GPU the autotuner cannot time its candidates: each reports the same time, so the first one runs.
autotuner.Autotuner.do_bench = property(lambda self: lambda kernel_call, quantiles: (1.0, 1.0, 1.0))


class LoopIndex(int):
    # A compiled kernel's loop index is a Triton scalar, which fla's chunked kernels convert (``i_t.to(tl.int64)``);
    # the interpreter's is a Python int.
    def to(self, dtype):
        return tl.full((), int(self), dtype)


def loop_indices_as_scalars():
    # Every fla.ops module imported so far reads ``range`` as one that yields such indices.
    for name, module in list(sys.modules.items()):
        if name.startswith("fla.ops"):
            module.range = lambda *bounds: map(LoopIndex, builtins.range(*bounds))
"""
"""Preamble of a script that runs fla's chunked kernels under the interpreter: call ``loop_indices_as_scalars()``
after importing them. Their float32 forms compute correctly there; bfloat16 inputs do not."""


def skip_where_the_interpreter_cannot_run_decode_steps(kernel: str) -> None:
    """Skip the calling test under Triton < 3.9, whose interpreter fails on the token loop of fla's decode-step
    kernels (a loop bounded by a runtime integer; 3.6's fails, 3.9's runs it, 3.7 and 3.8 untried). On a GPU the
    CUDA tests run the kernel itself."""
    triton = pytest.importorskip("triton")
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 9):
        pytest.skip(f"Triton {triton.__version__}'s interpreter fails on the token loop of {kernel}; 3.9's runs it")


def run_interpreted(script: str) -> None:
    """Run ``script`` in a fresh process under Triton's interpreter; it must print "ok" and nothing else."""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0 and result.stdout.split() == ["ok"], result.stderr[-3000:]
