"""Triton kernels compiled for an H100 on the CPU: what Triton's interpreter cannot show (that the compiler accepts a
kernel, and how it loads memory)."""

from __future__ import annotations

import re


def hopper_loads(kernel, types: dict[str, str], constants: dict[str, object], num_warps: int = 4) -> set[str]:
    """The global loads of a Triton kernel compiled (on the CPU, through ptxas) for an H100 (sm_90), as a launch on
    tensors aligned to 16 bytes compiles it: ``types`` gives the runtime arguments' Triton types (pointers, and
    integers the kernel lets Triton specialise, divisible by 16), ``constants`` the compile-time ones (an integer
    argument equal to 1 among them, as Triton specialises it)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(kernel.arg_names)
    signature = {name: types.get(name, "constexpr") for name in names}
    aligned = {(names.index(name),): [["tt.divisibility", 16]] for name, kind in types.items()
               if kind.startswith("*") or (kind == "i32" and name not in kernel.do_not_specialize)}
    source = ASTSource(fn=kernel, signature=signature, attrs=aligned,
                       constexprs={(names.index(name),): value for name, value in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert compiled.asm.get("cubin"), "ptxas made no binary"
    return set(re.findall(r"ld\.global[.\w]*", compiled.asm["ptx"]))
