"""Tests that run fla's kernels on the CPU under Triton's interpreter: which Triton's interpreter runs their loops,
what fla's chunked kernels need to run there, and a fresh process to run them in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

def run_fla_chunked_kernels() -> None:
    """Make fla's chunked kernels run under the interpreter, in a process where it is on (call after importing
    them): the autotuner, which cannot time its candidates without a GPU, takes the first; and every fla.ops module
    imported so far reads ``range`` as one whose indices have ``.to(dtype)``, as a compiled kernel's loop index (a
    Triton scalar) has and fla's kernels use. Their float32 forms then compute correctly; bfloat16 inputs do not."""
    import builtins

    import triton.language as tl
    from triton.runtime import autotuner

    class LoopIndex(int):
        def to(self, dtype):
            return tl.full((), int(self), dtype)

    autotuner.Autotuner.do_bench = property(lambda self: lambda kernel_call, quantiles: (1.0, 1.0, 1.0))
    for name, module in list(sys.modules.items()):
        if name.startswith("fla.ops"):
            module.range = lambda *bounds: map(LoopIndex, builtins.range(*bounds))


def skip_where_the_interpreter_cannot_run_decode_steps(kernel: str) -> None:
    """Skip the calling test under Triton < 3.9, whose interpreter fails on the token loop of fla's decode-step
    kernels (a loop bounded by a runtime integer; 3.6's fails, 3.9's runs it, 3.7 and 3.8 untried). On a GPU the
    CUDA tests run the kernel itself."""
    triton = pytest.importorskip("triton")
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 9):
        pytest.skip(f"Triton {triton.__version__}'s interpreter fails on the token loop of {kernel}; 3.9's runs it")


def run_interpreted(script: str) -> None:
    """Run ``script`` in a fresh process under Triton's interpreter, where this folder's modules can be imported;
    it must print "ok" and nothing else."""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).parent)})
    assert result.returncode == 0 and result.stdout.split() == ["ok"], result.stderr[-3000:]
