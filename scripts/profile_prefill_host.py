"""Where the host's time goes in one prefill of a small hybrid model, on a GPU: the source with its stock class, the
same source with the shipped class (every layer unpruned, under the shipped forward), and the pruned folders.

    python scripts/profile_prefill_host.py --work NEW_FOLDER --out-dir DIR [--family qwen3_5] [--rounds 3]
        [--no-profile] [--kernels] [--variants heads,channels] [--fla-group 2]

The models are those of ``check_families_gpu.py`` (random weights, head size 128, 3 or 4 layers, bf16), built in
``--work`` (``--fla-group``: value heads per key head of fla's Gated DeltaNet and KDA, 1 for ungrouped). Each
variant prefills 4 x 2048 tokens ten times in a row, in turns (the order reversed every round), for ``--rounds``
rounds; the host's time to return from the ten calls and the wall time until the GPU finished, per
prefill, are printed and written to ``DIR/profile_prefill_host_FAMILY.log`` (close together: the host sets the pace,
or waits inside the call), then each variant's wall time over the source's in the same round, and their median.
``source_shipped`` is item 1's clause "an unpruned layer costs no more than the stock forward"; its logits are first
compared with the stock class's on the same tokens (largest and mean difference, share of equal argmaxes). Then
(unless ``--no-profile``) cProfile of 20 prefills of each variant, the functions with the most own and cumulative time
written to ``DIR/profile_prefill_host_FAMILY.txt`` (cProfile slows Python calls more than GPU work: compare the
unprofiled times, read the profile for where the calls go). With ``--kernels``, PyTorch's profiler then records
one prefill of each variant on the GPU: its launches and GPU kernel time, and the kernels whose GPU time differs most
from the source's (by name; ms per prefill), printed and written to ``DIR/profile_prefill_host_FAMILY_kernels.json``:
whether a variant's extra time is the GPU's work or the host's. That file also holds the launch configurations
fla's config-file kernels ran with (``fla_configs``; fla caches its autotuning choices in the Triton cache, so they
may come from an earlier process's shapes).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import check_families_gpu  # noqa: E402
from bench_inference import Runner, on_device  # noqa: E402

DIFFERENCES = 12
"""Kernels listed per variant with ``--kernels``: those whose GPU time differs most from the source's."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="a new folder for the models")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--family", default="qwen3_5", choices=[f for g in check_families_gpu.WORKERS for f in g])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of ten prefills per variant")
    parser.add_argument("--no-profile", action="store_true", help="time only; no cProfile (shortens the run)")
    parser.add_argument("--kernels", action="store_true",
                        help="also record each variant's GPU kernel time per kernel and compare it with the source's")
    parser.add_argument("--variants", default=",".join(check_families_gpu.SPEED_VARIANTS),
                        help="the pruned folders profiled beside the source, comma-separated (empty: none; each "
                             "folder of other key widths compiles and autotunes fla's kernels again)")
    parser.add_argument("--fla-group", type=int, default=check_families_gpu.FLA_GROUP,
                        help="value heads per key head of fla's Gated DeltaNet and KDA (1: ungrouped)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if check_families_gpu.group_refusal(check_families_gpu.FLA_WIDTH, args.fla_group):
        parser.error(check_families_gpu.group_refusal(check_families_gpu.FLA_WIDTH, args.fla_group))
    check_families_gpu.FLA_GROUP = args.fla_group
    variants = tuple(v for v in args.variants.split(",") if v)
    if not set(variants) <= set(check_families_gpu.SPEED_VARIANTS):
        parser.error(f"--variants takes {', '.join(check_families_gpu.SPEED_VARIANTS)}")
    check_families_gpu.SPEED_VARIANTS = variants
    outputs = [args.out_dir / f"profile_prefill_host_{args.family}.{suffix}"
               for suffix in ("log", "txt")[: 1 if args.no_profile else 2]]
    kernels_out = args.out_dir / f"profile_prefill_host_{args.family}_kernels.json"
    if args.kernels:
        outputs.append(kernels_out)
    taken = [str(path) for path in outputs if path.exists()]
    if taken:
        parser.error(f"will not overwrite {', '.join(taken)}: move them or choose another --out-dir")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    import compressor
    from compressor.tuned_kernels import autotuned_fla_configs

    compressor.register()
    runners = check_families_gpu.speed_runners(args.family, args.work)
    runners["source_shipped"] = Runner(args.work / args.family / "source")  # the shipped class, once registered
    log = open(outputs[0], "w")

    def say(line: str) -> None:
        print(line, flush=True)
        log.write(line + "\n")

    say(str({variant: type(runner.model).__name__ for variant, runner in runners.items()}))
    ids = {variant: runner.tokens(4, 2048) for variant, runner in runners.items()}
    for variant, runner in runners.items():
        for _ in range(3):
            runner.prefill(ids[variant])
    say("source_shipped vs source logits, bf16, 4 x 2048 tokens: "
        + logits_against_stock(runners["source"].model, runners["source_shipped"].model, ids["source"]))
    ratios = {variant: [] for variant in runners if variant != "source"}
    for turn in range(args.rounds):
        line, walls = [], {}
        for variant, runner in list(runners.items())[:: 1 if turn % 2 == 0 else -1]:
            torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(10):
                runner.prefill(ids[variant])
            returned = time.perf_counter()
            torch.cuda.synchronize()
            finished = time.perf_counter()
            walls[variant] = finished - started
            line.append(f"{variant} host {(returned - started) * 100:.2f} wall {(finished - started) * 100:.2f} ms")
        say(f"round {turn} " + " | ".join(line))
        for variant in ratios:
            ratios[variant].append(walls[variant] / walls["source"])
    for variant, values in ratios.items():
        rounds = " ".join(f"{ratio:.3f}" for ratio in values)
        say(f"{variant} / source: {rounds} (median {statistics.median(values):.3f})")
    if args.kernels:
        times = {variant: kernel_times(lambda: runner.prefill(ids[variant])) for variant, runner in runners.items()}
        report = {variant: summary(times[variant], None if variant == "source" else times["source"])
                  for variant in runners}
        for variant, figures in report.items():
            say(f"{variant} kernels: {figures['launches']} launches, GPU {figures['gpu_ms']:.3f} ms per prefill")
            for name, ms, source_ms in figures.get("differing_from_source", []):
                say(f"  {ms - source_ms:+.3f} ms  {name} ({source_ms:.3f} -> {ms:.3f})")
        report["fla_configs"] = autotuned_fla_configs()
        say(f"fla configurations held: {sum(len(k['autotune_entries']) for k in report['fla_configs'].values())} "
            f"keys of {len(report['fla_configs'])} kernels (in {kernels_out.name})")
        kernels_out.write_text(json.dumps(report, indent=1) + "\n")
    log.close()
    if args.no_profile:
        return
    with open(outputs[1], "w") as out:
        for variant, runner in runners.items():
            profiler = cProfile.Profile()
            torch.cuda.synchronize()
            profiler.enable()
            for _ in range(20):
                runner.prefill(ids[variant])
            profiler.disable()
            torch.cuda.synchronize()
            for key in ("tottime", "cumulative"):
                text = io.StringIO()
                pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(45)
                out.write(f"===== {variant} by {key} (20 prefills) =====\n{text.getvalue()}\n")


def logits_against_stock(stock, shipped, ids) -> str:
    """How far ``shipped``'s logits [B, T, vocabulary] lie from ``stock``'s on ``ids`` [B, T], two classes of the same
    weights: the largest and mean absolute difference, the logit scale and the share of positions whose argmax is
    equal (a wrong slice moves logits by their own size)."""
    with torch.no_grad():
        expected, got = (model(ids).logits.float() for model in (stock, shipped))
    difference = (got - expected).abs()
    return (f"max difference {difference.max().item():.3g}, mean {difference.mean().item():.3g}, logit scale "
            f"{expected.abs().max().item():.3g}, argmax equal at "
            f"{(got.argmax(-1) == expected.argmax(-1)).float().mean().item():.2%} of positions")


def kernel_times(prefill) -> dict[str, tuple[float, int]]:
    """{kernel name: (GPU ms, launches)} of one call of ``prefill`` under PyTorch's profiler (after one untimed
    call), from its device-side events."""
    from torch.profiler import ProfilerActivity, profile

    prefill()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        prefill()
        torch.cuda.synchronize()
    return {e.key: (e.self_device_time_total / 1e3, e.count) for e in on_device(prof.key_averages())}


def summary(times: dict[str, tuple[float, int]], source: dict[str, tuple[float, int]] | None) -> dict:
    """A variant's launches and GPU ms from ``kernel_times``, and given the source's, the ``DIFFERENCES`` kernels
    whose GPU time differs most from the source's: [name, ms, source's ms], largest difference first (a kernel only
    one of them runs counts 0 ms in the other)."""
    figures = {"launches": sum(count for _, count in times.values()),
               "gpu_ms": round(sum(ms for ms, _ in times.values()), 3)}
    if source is not None:
        names = sorted(times.keys() | source.keys(),
                       key=lambda name: -abs(times.get(name, (0.0, 0))[0] - source.get(name, (0.0, 0))[0]))
        figures["differing_from_source"] = [[name[:80], round(times.get(name, (0.0, 0))[0], 4),
                                             round(source.get(name, (0.0, 0))[0], 4)]
                                            for name in names[:DIFFERENCES]]
    return figures


if __name__ == "__main__":
    main()
