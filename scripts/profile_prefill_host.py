"""Where the host's time goes in one prefill of a small hybrid model, on a GPU: the source with its stock class, the
same source with the shipped class (every layer unpruned, under the shipped forward), and the pruned folders.

    python scripts/profile_prefill_host.py --work NEW_FOLDER --out-dir DIR [--family qwen3_5] [--rounds 3]
        [--no-profile]

The models are those of ``check_families_gpu.py`` (random weights, head size 128, 3 or 4 layers, bf16), built in
``--work``. Each variant prefills 4 x 2048 tokens ten times in a row, in turns (the order reversed every round), for
``--rounds`` rounds; the host's time to return from the ten calls and the wall time until the GPU finished, per
prefill, are printed and written to ``DIR/profile_prefill_host_FAMILY.log`` (close together: the host sets the pace,
or waits inside the call), then each variant's wall time over the source's in the same round, and their median.
``source_shipped`` is item 1's clause "an unpruned layer costs no more than the stock forward". Then (unless
``--no-profile``) cProfile of 20 prefills of each variant, the functions with the most own and cumulative time
written to ``DIR/profile_prefill_host_FAMILY.txt`` (cProfile slows Python calls more than GPU work: compare the
unprofiled times, read the profile for where the calls go).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import check_families_gpu  # noqa: E402
from bench_inference import Runner  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="a new folder for the models")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--family", default="qwen3_5", choices=[f for g in check_families_gpu.WORKERS for f in g])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of ten prefills per variant")
    parser.add_argument("--no-profile", action="store_true", help="time only; no cProfile (shortens the run)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    outputs = [args.out_dir / f"profile_prefill_host_{args.family}.{suffix}"
               for suffix in ("log", "txt")[: 1 if args.no_profile else 2]]
    taken = [str(path) for path in outputs if path.exists()]
    if taken:
        parser.error(f"will not overwrite {', '.join(taken)}: move them or choose another --out-dir")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    import compressor

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


if __name__ == "__main__":
    main()
