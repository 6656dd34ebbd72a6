"""Time the configurations of four of the project's kernels at the sizes a prefill hands them, beside the fla
kernels they replace, to choose the ones they launch with: KDA's decay and its chunk sums in one launch
(``channel_gate.gated_chunk_cumulative``: ``SUM_BLOCK_CHANNELS``, ``SUM_NUM_WARPS``), KDA's diagonal blocks of the
intra-chunk scores (``kda_diagonal.py``: ``BLOCK_ENTRIES``, ``NUM_WARPS``), the short convolutions written per
head (``short_conv.py``: ``BLOCK_TOKENS``, ``NUM_WARPS``) and the gated output norm of rows where the recurrence
leaves them (``head_norm.py``: ``BLOCK_ROWS``, ``NUM_WARPS``).

    python scripts/tune_project_kernels.py --out results.json [--cases channel_gate,kda_diagonal,short_conv,head_norm]

Sizes: prefills of 4 x 2048 and 1 x 8192 tokens; layers of 4 key heads read by 8 value heads and of 16 read by 32,
heads of 128, bf16. KDA's gate: float32 output, written interleaved (2 value heads per key head, as the grouped layer
writes it) and head-major, the softplus gate and the bounded one (whose arithmetic is cheaper). The convolutions:
queries and keys in one launch, normalised as for Gated DeltaNet and KDA, then the values, 4 taps. The norm: the
sigmoid gate, rows interleaved and head-major. fla's stock pieces beside them: its gate-fused chunk sum
(``kda_gate_chunk_cumsum``, autotuned), its token-parallel kernel of the diagonal blocks (autotuned) on the same heads
laid out as batch entries and on the stock layout [B, T, H, K], its three convolutions (``causal_conv1d``,
autotuned) with the L2 norms of queries and keys (``l2norm_fwd``; the head copies that followed them are not
counted; its Python wrappers can take longer than the GPU's work at these sizes, which this timing then measures),
and its ``FusedRMSNormGated`` on contiguous rows. ``triton.testing.do_bench`` times the GPU between events around
each call (microseconds), printed as measured, written at the end. Needs a CUDA GPU and fla.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
SHAPES = [(4, 2048), (1, 8192)]
"""(batch, tokens) of the prefills."""
HEADS = [(4, 8), (16, 32)]
"""(key heads, value heads) of the layers."""
WIDTH, TAPS = 128, 4
CASES = ("channel_gate", "kda_diagonal", "short_conv", "head_norm")
"""The kernels ``--cases`` may name."""


def gate_candidates(batch: int, length: int, key_heads: int, value_heads: int) -> dict:
    """{name: call} for KDA's decay and its chunk sums at [batch, length, value_heads, 128], written as the grouped
    layer writes them (value_heads / key_heads heads per key head, interleaved) and head-major; the softplus gate and
    the bounded one (a sigmoid: which of the kernel's time is its arithmetic)."""
    from fla.ops.kda.gate import kda_gate_chunk_cumsum

    from compressor.modeling import channel_gate

    f = torch.randn(batch, length, value_heads, WIDTH, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(value_heads, WIDTH, device="cuda")
    a_log = torch.randn(value_heads, device="cuda")
    rate = a_log.exp().contiguous()
    calls = {}
    for bound in (None, -5.0):
        form = "softplus" if bound is None else "bounded"
        calls[f"fla kda_gate_chunk_cumsum, {form} (autotuned)"] = (
            lambda bound=bound: kda_gate_chunk_cumsum(f, a_log, chunk_size=64, scale=channel_gate.LOG2_E,
                                                      dt_bias=bias.view(-1), lower_bound=bound))

    def configured(channels, warps, ratio, bound):
        def call():
            channel_gate.SUM_BLOCK_CHANNELS, channel_gate.SUM_NUM_WARPS = channels, warps
            channel_gate.gated_chunk_cumulative(f, channel_gate.DecayGate(bias, rate, bound), values_per_key=ratio)
        return call

    for ratio, bound in itertools.product(sorted({value_heads // key_heads, 1}, reverse=True), (None, -5.0)):
        for channels, warps in itertools.product([16, 32, 64], [1, 2, 4]):
            name = {"SUM_BLOCK_CHANNELS": channels, "SUM_NUM_WARPS": warps, "values_per_key": ratio,
                    "gate": "softplus" if bound is None else "bounded"}
            calls[json.dumps(name)] = configured(channels, warps, ratio, bound)
    return calls


def diagonal_candidates(batch: int, length: int, heads: int) -> dict:
    """{name: call} for KDA's diagonal blocks of [batch, length, heads, 128] queries and keys."""
    from fla.ops.kda.chunk_intra_token_parallel import chunk_kda_fwd_intra_token_parallel

    from compressor.modeling import kda_diagonal
    from compressor.modeling.channel_gate import chunk_cumulative

    def inputs(entries, per_entry):
        q, k = (torch.nn.functional.normalize(torch.randn(entries, length, per_entry, WIDTH, device="cuda"), dim=-1)
                .to(torch.bfloat16) for _ in "qk")
        g = chunk_cumulative(torch.nn.functional.logsigmoid(torch.randn(entries, length, per_entry, WIDTH,
                                                                         device="cuda")) / 16).contiguous()
        beta = torch.rand(entries, length, per_entry, device="cuda").to(torch.bfloat16)
        scores = (torch.empty(entries, length, per_entry, 64, device="cuda", dtype=torch.bfloat16),
                  torch.empty(entries, length, per_entry, kda_diagonal.BLOCK, device="cuda"))
        return q, k, g, beta, scores

    batched, stock = inputs(batch * heads, 1), inputs(batch, heads)

    def fla(q, k, g, beta, scores):
        return lambda: chunk_kda_fwd_intra_token_parallel(q=q, k=k, gk=g, beta=beta, Aqk=scores[0], Akk=scores[1],
                                                          scale=0.1, chunk_size=64, sub_chunk_size=kda_diagonal.BLOCK)

    calls = {"fla token-parallel, heads as batch entries (autotuned)": fla(*batched),
             "fla token-parallel, stock layout (autotuned)": fla(*stock)}

    def configured(entries, warps):
        def call():
            kda_diagonal.BLOCK_ENTRIES, kda_diagonal.NUM_WARPS = entries, warps
            q, k, g, beta, scores = batched
            kda_diagonal.diagonal_blocks(q, k, g, beta, 0.1, *scores)
        return call

    for entries, warps in itertools.product([1, 2, 4, 8], [1, 2, 4, 8]):
        calls[json.dumps({"BLOCK_ENTRIES": entries, "NUM_WARPS": warps})] = configured(entries, warps)
    return calls


def convolution_candidates(batch: int, length: int, key_heads: int, value_heads: int) -> dict:
    """{name: call} for the convolutions of queries, keys [batch, length, key_heads·128] and values
    [batch, length, value_heads·128]."""
    from fla.modules.causal_conv1d import causal_conv1d
    from fla.modules.norm.l2norm import l2norm_fwd

    from compressor.modeling import short_conv
    from compressor.modeling.packed_heads import L2_EPS

    def inputs(heads):
        return (torch.randn(batch, length, heads * WIDTH, device="cuda", dtype=torch.bfloat16),
                torch.randn(heads * WIDTH, TAPS, device="cuda", dtype=torch.bfloat16))

    (q, q_taps), (k, k_taps), (v, v_taps) = inputs(key_heads), inputs(key_heads), inputs(value_heads)
    index = torch.arange(value_heads, device="cuda") // (value_heads // key_heads)
    values = torch.arange(value_heads, device="cuda")

    def stock():
        q_out, k_out, _ = (causal_conv1d(x=x, weight=w, activation="silu")[0]
                           for x, w in ((q, q_taps), (k, k_taps), (v, v_taps)))
        return [l2norm_fwd(x.view(batch, length, key_heads, WIDTH)) for x in (q_out, k_out)]

    calls = {"fla causal_conv1d x 3 and l2norm_fwd x 2 (autotuned)": stock}

    def configured(tokens, warps):
        def call():
            short_conv.BLOCK_TOKENS, short_conv.NUM_WARPS = tokens, warps
            short_conv.convolved_heads([q, k], [q_taps, k_taps], [None, None], [None, None], index, WIDTH, True,
                                       L2_EPS)
            short_conv.convolved_heads([v], [v_taps], [None], [None], values, WIDTH, True)
        return call

    for tokens, warps in [*itertools.product([16, 32, 64], [1, 2, 4, 8]), (128, 4), (128, 8)]:
        calls[json.dumps({"BLOCK_TOKENS": tokens, "NUM_WARPS": warps})] = configured(tokens, warps)
    return calls


def norm_candidates(batch: int, length: int, key_heads: int, value_heads: int) -> dict:
    """{name: call} for the gated output norm of [batch, length, value_heads, 128] rows where the grouped layer's
    recurrence leaves them (value_heads / key_heads per key head, interleaved; and head-major), beside fla's module on
    the stock layer's contiguous rows."""
    from fla.modules import FusedRMSNormGated

    from compressor.modeling import head_norm

    ratio = value_heads // key_heads
    rows = torch.randn(batch, length, value_heads, WIDTH, device="cuda", dtype=torch.bfloat16)
    gate = torch.randn_like(rows)
    layouts = {ratio: rows.view(batch, key_heads, length, ratio, WIDTH).transpose(1, 2),
               1: rows.view(batch, value_heads, length, WIDTH).transpose(1, 2)}
    stock = FusedRMSNormGated(WIDTH, activation="sigmoid", eps=1e-6).to(device="cuda", dtype=torch.bfloat16)
    calls = {"fla FusedRMSNormGated, contiguous rows (autotuned)": lambda: stock(rows, gate)}

    def configured(block, warps, ratio):
        def call():
            head_norm.BLOCK_ROWS, head_norm.NUM_WARPS = block, warps
            head_norm.rms_normalised(layouts[ratio], stock.weight, 1e-6, gate.view(layouts[ratio].shape), "sigmoid")
        return call

    for ratio, block, warps in itertools.product(sorted(layouts, reverse=True), [4, 8, 16, 32, 64], [1, 2, 4, 8]):
        name = {"BLOCK_ROWS": block, "NUM_WARPS": warps, "values_per_key": ratio}
        calls[json.dumps(name)] = configured(block, warps, ratio)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", default=",".join(CASES), help="the kernels to time, comma-separated")
    args = parser.parse_args()
    chosen = set(args.cases.split(","))
    unknown = chosen - set(CASES)
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    if args.out.exists():
        parser.error(f"will not overwrite {args.out}")
    if not torch.cuda.is_available():
        sys.exit("tune_project_kernels.py needs a CUDA GPU")
    from triton.testing import do_bench

    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    candidates = {"channel_gate": lambda shape, heads: gate_candidates(*shape, *heads),
                  "kda_diagonal": lambda shape, heads: diagonal_candidates(*shape, heads[1]),
                  "short_conv": lambda shape, heads: convolution_candidates(*shape, *heads),
                  "head_norm": lambda shape, heads: norm_candidates(*shape, *heads)}
    cases = [(f"{name} {shape[0]}x{shape[1]}, {heads[0]}/{heads[1]} heads", make, shape, heads)
             for name, make in candidates.items() if name in chosen
             for shape, heads in itertools.product(SHAPES, HEADS)]
    with torch.no_grad():
        for case, make, shape, heads in cases:
            calls = make(shape, heads)
            times = {name: round(do_bench(call, warmup=5, rep=25) * 1e3, 1) for name, call in calls.items()}
            results[case] = times
            best = min(times, key=times.get)
            print(f"{case}: best {best} {times[best]} us; " + "; ".join(f"{n} {t}" for n, t in times.items()),
                  flush=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
