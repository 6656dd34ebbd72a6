"""Instructions of the project's Triton kernels beside fla's, compiled for an H100 (sm_90) on the CPU: a proxy, needing
no GPU, for kernels whose time goes to arithmetic rather than memory.

    python scripts/count_instructions.py [--out counts.json]

Each kernel is compiled as a prefill launches it (``triton.compile`` for ``GPUTarget("cuda", 90, 32)``, through the
ptxas Triton ships) and disassembled with the cuobjdump Triton ships; printed are the SASS instructions of the whole
kernel (a static count: every thread runs most of them once, a loop's body once per turn), the same per value a
thread computes (tiles differ in values per thread), and the calls among them (a 64-bit integer division, for one,
is a call to a subroutine of its own). The kernels: KDA's decay gate with its
chunk sums (``channel_gate.py``, the softplus and the bounded form, at the launched tile) beside fla's gate-fused
chunk sum (``kda_gate_chunk_cumsum``) at the tiles its autotuner chooses among; the gated output norm
(``head_norm.py``) beside fla's gated norm (``layer_norm_gated_fwd_kernel``) at the launched tile. The counts depend
on the Triton version; the GPU's profiler (``profile_prefill_host.py --kernels``) and ``tune_project_kernels.py``
time them.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def jit_function(kernel):
    """The ``triton.JITFunction`` beneath a kernel's autotuner and heuristics."""
    from triton.runtime import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def sass_counts(kernel, types: dict[str, str], constants: dict[str, object], num_warps: int,
                values: int) -> dict[str, float]:
    """{"instructions": n, "calls": c, "values_per_thread": v, "instructions_per_value": n / v} of ``kernel``
    compiled for sm_90: ``types`` the runtime arguments' Triton types, ``constants`` the compile-time ones, ``values``
    the values a program computes (its threads share them)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = jit_function(kernel)
    signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature, constexprs={
        (kernel.arg_names.index(name),): value for name, value in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        listing = subprocess.run([str(cuobjdump), "-sass", cubin.name], capture_output=True, text=True,
                                 check=True).stdout
    opcodes = Counter(match.group(1) for match in re.finditer(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)",
                                                               listing))
    count, per_thread = sum(opcodes.values()), values / (32 * num_warps)
    return {"instructions": count, "calls": sum(n for op, n in opcodes.items() if op.startswith("CALL")),
            "values_per_thread": per_thread, "instructions_per_value": round(count / per_thread, 1)}


def gate_kernels() -> dict[str, tuple]:
    """{name: (kernel, types, constants, warps, values a program computes)} for KDA's gate with its chunk sums, 128
    channels, bf16 input."""
    from fla.ops.kda.gate import kda_gate_chunk_cumsum_vector_kernel

    from compressor.modeling import channel_gate
    from compressor.modeling.packed_heads import CHUNK_SIZE

    ours = dict(f="*bf16", bias="*fp32", rate="*fp32", out="*fp32", lower_bound="fp32", scale="fp32", T="i32",
                H="i32", NT="i32", NK="i32", s_b="i32", s_t="i32", s_h="i32", R="i32")
    kernels = {}
    for form in ("softplus", "bounded"):
        constants = dict(K=128, BT=CHUNK_SIZE, BK=channel_gate.SUM_BLOCK_CHANNELS, GATED=True,
                         BOUNDED=form == "bounded", CUMULATIVE=True, FAST_LOG=True)
        kernels[f"channel_gate_kernel, {form}, {channel_gate.SUM_BLOCK_CHANNELS} channels, "
                f"{channel_gate.SUM_NUM_WARPS} warp(s)"] = (channel_gate.channel_gate_kernel, ours, constants,
                                                            channel_gate.SUM_NUM_WARPS,
                                                            CHUNK_SIZE * channel_gate.SUM_BLOCK_CHANNELS)
    fla = dict(s="*bf16", A_log="*fp32", dt_bias="*fp32", o="*fp32", scale="fp32", cu_seqlens="*i32",
               chunk_indices="*i32", lower_bound="fp32", T="i32")
    for channels, warps in ((32, 2), (32, 4), (64, 4)):
        constants = dict(H=8, S=128, BT=CHUNK_SIZE, BS=channels, REVERSE=False, HAS_A=True, HAS_BIAS=True,
                         HAS_SCALE=True, IS_VARLEN=False, USE_LOWER_BOUND=False, USE_GRAPH=False)
        kernels[f"fla kda_gate_chunk_cumsum_vector_kernel, softplus, {channels} channels, {warps} warps"] = (
            kda_gate_chunk_cumsum_vector_kernel, fla, constants, warps, CHUNK_SIZE * channels)
    return kernels


def norm_kernels() -> dict[str, tuple]:
    """{name: (kernel, types, constants, warps, values a program computes)} for the sigmoid-gated output norm of rows
    of 128, bf16."""
    from compressor.modeling import head_norm
    from compressor.modeling.fla_rows import GATED_NORM_CONFIG, gated_norm_kernel

    ours = dict(x="*bf16", g="*bf16", w="*fp32", y="*bf16", eps="fp32", N="i32", T="i32", H="i32", R="i32",
                **{f"s{t}_{d}": "i32" for t in "xg" for d in "bthr"})
    kernels = {f"head_norm_kernel, {head_norm.BLOCK_ROWS} rows, {head_norm.NUM_WARPS} warps": (
        head_norm.head_norm_kernel, ours, dict(D=128, BD=128, BR=head_norm.BLOCK_ROWS, ACTIVATION="sigmoid"),
        head_norm.NUM_WARPS, head_norm.BLOCK_ROWS * 128)}
    fla_kernel = gated_norm_kernel()
    if fla_kernel is not None:
        fla = dict(x="*bf16", g="*bf16", y="*bf16", w="*fp32", b="*fp32", residual="*bf16", residual_out="*bf16",
                   mean="*fp32", rstd="*fp32", eps="fp32", T="i32")
        constants = dict(D=128, BD=128, NB=1, ACTIVATION="sigmoid", IS_RMS_NORM=True, STORE_RESIDUAL_OUT=False,
                         HAS_RESIDUAL=False, HAS_WEIGHT=True, HAS_BIAS=False, BT=GATED_NORM_CONFIG["BT"])
        kernels[f"fla layer_norm_gated_fwd_kernel, {GATED_NORM_CONFIG['BT']} rows, "
                f"{GATED_NORM_CONFIG['num_warps']} warps"] = (fla_kernel, fla, constants,
                                                               GATED_NORM_CONFIG["num_warps"],
                                                               GATED_NORM_CONFIG["BT"] * 128)
    return kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.out is not None and args.out.exists():
        parser.error(f"will not overwrite {args.out}")
    import triton

    results = {"triton": triton.__version__, "target": "sm_90"}
    for name, (kernel, types, constants, warps, values) in {**gate_kernels(), **norm_kernels()}.items():
        counts = results[name] = sass_counts(kernel, types, constants, warps, values)
        print(f"{name}: {counts['instructions']} instructions ({counts['instructions_per_value']} a value, "
              f"{counts['values_per_thread']:g} values a thread), {counts['calls']} calls", flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
