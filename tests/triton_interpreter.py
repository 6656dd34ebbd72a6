"""Tests that run fla's kernels on the CPU under Triton's interpreter: which Triton's interpreter runs their loops,
what fla's chunked kernels need to run there, and a fresh process to run them in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def run_fla_chunked_kernels() -> None:
    """Make fla's chunked kernels run under the interpreter as on a GPU, in a process where it is on (call after
    importing them): the autotuner, which cannot time its candidates without a GPU, takes the first; every fla.ops
    module imported so far reads ``range`` as one whose indices have ``.to(dtype)``, as a compiled kernel's loop
    index (a Triton scalar) has and fla's kernels use; and matrix products and elementwise arithmetic on bfloat16
    compute on its values, not its bits. (Reductions and fused multiply-adds of bfloat16 would still read bits;
    fla's kernels convert to float32 before those.)"""
    import builtins

    import numpy as np
    import triton.language as tl
    from triton.runtime import autotuner, interpreter

    class LoopIndex(int):
        def to(self, dtype):
            return tl.full((), int(self), dtype)

    autotuner.Autotuner.do_bench = property(lambda self: lambda kernel_call, quantiles: (1.0, 1.0, 1.0))
    # The interpreter keeps bfloat16 as its bits (uint16) and computes on those; a GPU computes on the numbers
    # (in float32, rounding each result to bfloat16).
    builder = interpreter.InterpreterBuilder
    dot, binary, unary = builder.create_dot, builder.binary_op, builder.unary_op

    def as_float(x):
        return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def as_bfloat16(data):
        bits = data.astype(np.float32).view(np.uint32)
        return interpreter.TensorHandle(((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16), tl.bfloat16)

    COMPARISONS = (np.less, np.greater, np.less_equal, np.greater_equal, np.equal, np.not_equal)

    def is_bfloat16(x):
        return x.dtype.scalar == tl.bfloat16

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a, b = (as_float(x) if is_bfloat16(x) else x for x in (a, b))
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def binary_op(self, lhs, rhs, op):
        if not (is_bfloat16(lhs) and is_bfloat16(rhs)):
            return binary(self, lhs, rhs, op)
        result = binary(self, as_float(lhs), as_float(rhs), op)
        return result if op in COMPARISONS else as_bfloat16(result.data)

    def unary_op(self, arg, op):
        return as_bfloat16(unary(self, as_float(arg), op).data) if is_bfloat16(arg) else unary(self, arg, op)

    builder.create_dot, builder.binary_op, builder.unary_op = create_dot, binary_op, unary_op
    list_builtins_once()
    for name, module in list(sys.modules.items()):
        if name.startswith("fla.ops"):
            module.range = lambda *bounds: map(LoopIndex, builtins.range(*bounds))


def list_builtins_once() -> None:
    """Make Triton's interpreter find each package's builtins once (idempotent). At every kernel launch, and at
    every call of a jitted helper inside one, its ``_patch_builtin(pkg, builder, scope)`` replaces each builtin of
    ``pkg`` by one that computes on the host, finding them by ``inspect.getmembers``: most of the interpreter's own
    time in fla's kernels. Here they are listed once per package; as before, a builtin already replaced (a helper
    called inside a kernel) is left as it is."""
    import inspect

    import triton.language as tl
    from triton.runtime import interpreter

    if getattr(interpreter._patch_builtin, "lists_builtins_once", False):
        return
    if list(inspect.signature(interpreter._patch_builtin).parameters) != ["pkg", "builder", "scope"]:
        return  # another Triton's interpreter, left as it is
    listed: dict[int, tuple[object, list[tuple[str, object]]]] = {}

    def builtins_of(pkg) -> list[tuple[str, object]]:
        if id(pkg) not in listed:  # the package is kept with its list, so its id is not reused
            listed[id(pkg)] = pkg, [(name, member) for name, member in inspect.getmembers(pkg)
                                    if tl.core.is_builtin(member)]
        return listed[id(pkg)][1]

    for pkg in (tl, tl.core, tl.tensor, tl.math, getattr(tl.core, "tensor_descriptor_base", None)):
        if pkg is not None:  # listed before any is replaced
            builtins_of(pkg)

    def patch_builtin(pkg, builder, scope):
        for name, member in builtins_of(pkg):
            if getattr(pkg, name, None) is member:
                interpreter._patch_attr(pkg, name, member, builder, scope)

    patch_builtin.lists_builtins_once = True
    interpreter._patch_builtin = patch_builtin


def skip_where_the_interpreter_fails_on(what: str) -> None:
    """Skip the calling test under Triton < 3.9, whose interpreter fails on ``what``: the token loop of fla's
    decode-step kernels (a loop bounded by a runtime integer), and fla's chunked kernels as
    ``run_fla_chunked_kernels`` prepares them ("only 0-dimensional arrays can be converted to Python scalars"); 3.6's
    fails, 3.9's runs them, 3.7 and 3.8 untried. On a GPU the CUDA tests run the kernels themselves."""
    triton = pytest.importorskip("triton")
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 9):
        pytest.skip(f"Triton {triton.__version__}'s interpreter fails on {what}; 3.9's runs it")


def interpreted_environment() -> dict[str, str]:
    """This process's environment with Triton's interpreter on, and this checkout's ``compressor`` and test modules
    first on the import path (another checkout may be the one installed)."""
    path = os.pathsep.join(filter(None, [str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}


def run_interpreted(script: str) -> None:
    """Run ``script`` in a fresh process (``interpreted_environment``, ``list_builtins_once``); it must print "ok"
    and nothing else."""
    lines = script.splitlines(keepends=True)
    future = next((i for i, line in enumerate(lines) if not line.startswith("from __future__")), len(lines))
    script = "".join([*lines[:future], "import triton_interpreter\ntriton_interpreter.list_builtins_once()\n",
                      *lines[future:]])
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env=interpreted_environment())
    assert result.returncode == 0 and result.stdout.split() == ["ok"], result.stderr[-3000:]
