"""Time every configuration fla autotunes its row kernels among (l2norm, gated RMS norm) at the sizes a model hands
them, beside fla's own autotuned public functions, to choose the configurations ``fla_rows.py`` launches them with
(``L2NORM_CONFIG``, ``GATED_NORM_CONFIG``).

    python scripts/tune_row_kernels.py --out results.json [--kernels gated_norm]

Sizes: rows of a short prefill (64 tokens x 32 heads) and of prefills of 8,192 tokens over 8, 20 and 32 heads, of
128 and 256 channels, bfloat16. For every configuration the time at each size relative to the best configuration
there, and the worst of those ratios, printed as measured and written after each kernel. ``triton.testing.do_bench``
times the GPU between events around each call; small calls of fla's public functions are bound by their host time.
Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
ROWS = [64 * 32, 8192 * 8, 8192 * 20, 8192 * 32]  # rows: tokens x heads
WIDTHS = [128, 256]


def launches(name: str, rows: int, width: int):
    """(fla's public function, a function of one configuration's keywords) for ``name`` at [rows, width]."""
    from fla.modules.norm.fused_norm_gate import rms_norm_gated
    from fla.modules.norm.l2norm import l2norm_fwd

    from compressor.modeling import fla_rows

    x = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16)
    gate, weight = torch.randn_like(x), torch.randn(width, device="cuda", dtype=torch.bfloat16)
    rstd = torch.empty(rows, device="cuda", dtype=torch.float32)
    out = torch.empty_like(x)
    block = fla_rows.next_power_of_2(width)
    if name == "l2norm":
        def configured(BT, num_warps):
            fla_rows.l2norm_kernel()[(-(-rows // BT),)](x=x, y=out, rstd=rstd, eps=1e-6, T=rows, D=width, BD=block,
                                                         NB=1, BT=BT, num_warps=num_warps)
        return lambda: l2norm_fwd(x), configured

    def configured(BT, num_warps):
        fla_rows.gated_norm_kernel()[(-(-rows // BT),)](
            x=x, g=gate, y=out, w=weight, b=None, residual=None, residual_out=None, mean=None, rstd=rstd, eps=1e-6,
            T=rows, D=width, BD=block, NB=1, ACTIVATION="silu", IS_RMS_NORM=True, STORE_RESIDUAL_OUT=False,
            HAS_RESIDUAL=False, HAS_WEIGHT=True, HAS_BIAS=False, BT=BT, num_warps=num_warps)
    return lambda: rms_norm_gated(x, gate, weight, None, activation="silu", eps=1e-6), configured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--kernels", default="l2norm,gated_norm", help="which kernels to time (comma-separated)")
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"will not overwrite {args.out}")
    from bench_inference import versions
    from fla.modules.norm import fused_norm_gate, l2norm
    from triton.testing import do_bench

    from compressor.modeling import fla_rows

    configs = {"l2norm": l2norm.l2norm_fwd_kernel.configs,
               "gated_norm": fused_norm_gate.layer_norm_gated_fwd_kernel.fn.configs}  # beneath its heuristics
    unknown = set(args.kernels.split(",")) - set(configs)
    if unknown:
        parser.error(f"unknown kernels {sorted(unknown)}; choose among {sorted(configs)}")
    configs = {name: found for name, found in configs.items() if name in args.kernels.split(",")}
    launched = {"l2norm": fla_rows.L2NORM_CONFIG, "gated_norm": fla_rows.GATED_NORM_CONFIG}
    results = dict(versions=versions(), launched=launched, kernels={})
    with torch.no_grad():
        for name, kernel_configs in configs.items():
            chosen = json.dumps(launched[name])
            table = results["kernels"][name] = {}
            for width in WIDTHS:
                for rows in ROWS:
                    public, configured = launches(name, rows, width)
                    times = {"fla public (autotuned)": do_bench(public, warmup=5, rep=25) * 1e3}
                    for config in kernel_configs:
                        keywords = dict(BT=config.kwargs["BT"], num_warps=config.num_warps)
                        times[json.dumps(keywords)] = do_bench(lambda: configured(**keywords), warmup=5, rep=25) * 1e3
                    table[f"{rows}x{width}"] = times
                    best = min(v for k, v in times.items() if k.startswith("{"))
                    print(f"{name} {rows}x{width}: best configuration {best:.1f} us, fla public "
                          f"{times['fla public (autotuned)']:.1f} us, chosen {times[chosen] / best:.2f}x the best",
                          flush=True)
            worst = {}
            for times in table.values():
                best = min(v for k, v in times.items() if k.startswith("{"))
                for key, value in times.items():
                    worst[key] = max(worst.get(key, 0.0), value / best)
            results.setdefault("worst_ratio", {})[name] = dict(sorted(worst.items(), key=lambda item: item[1]))
            print(f"{name}: worst ratio to the best, lowest five: {list(results['worst_ratio'][name].items())[:5]}; "
                  f"chosen {worst[chosen]:.2f}", flush=True)
            args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
