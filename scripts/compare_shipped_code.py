"""Two versions of the shipped modeling code on one GPU, side by side: the same pruned folder loaded with an older
revision's modeling files and with the working tree's, against its source with the stock class.

    python scripts/compare_shipped_code.py --work DIR --out results.json --old-rev cdda7b9 [--families a,b] [--decode]

For each family of ``check_families_gpu.py`` (the same models at d_k = d_v = 128, random weights: 4 layers, fla's 3),
the
``heads`` folder is built with the working tree; ``heads_old`` is a copy of it whose ``*.py`` files are replaced by
``git show OLD_REV:compressor/modeling/NAME`` (weights and config are the export's, which the code change must not
touch). It reports whether the two give bit-identical bf16 logits on one 512-token prompt, then times prefill of
4 x 2048 tokens (7 rounds, the variants in turns with the order reversed every round, each round the median of 5
calls) and, with ``--decode``, the time per greedy decoding step at batch 16 (3 rounds). Prefill of these small models
is bound by the host's Python and launch time, which varies between rounds on a shared machine: compare the medians
and minima of many rounds, not one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests")]

ROUNDS, CALLS, DECODE_ROUNDS = 7, 5, 3


def git(*arguments: str) -> bytes:
    return subprocess.run(["git", "-C", str(ROOT), *arguments], check=True, capture_output=True).stdout


def old_folder(new: Path, old: Path, revision: str) -> None:
    """Copy the folder ``new`` to ``old`` with each shipped ``.py`` file as it was at ``revision``."""
    shutil.copytree(new, old)
    for path in old.glob("*.py"):
        path.write_bytes(git("show", f"{revision}:compressor/modeling/{path.name}"))


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def compare(name: str, work: Path, revision: str, decode: bool) -> dict:
    """Logit identity and timings of source / heads_old / heads for one family."""
    import check_families_gpu as families
    import torch
    from bench_inference import Runner

    families.build_folders(name, work)
    old_folder(work / name / "heads", work / name / "heads_old", revision)
    runners = {"source": families.stock_runner(work / name / "source"), "heads_old": Runner(work / name / "heads_old"),
               "heads": Runner(work / name / "heads")}
    ids = runners["source"].tokens(4, 2048)
    prompts = runners["source"].tokens(families.DECODE_BATCH, families.PROMPT)
    with torch.no_grad():
        logits = {variant: runner.model(ids[:1, :512]).logits.float() for variant, runner in runners.items()}
    figures = {"old_equals_new_logits": torch.equal(logits["heads_old"], logits["heads"]),
               "old_new_max_difference": (logits["heads_old"] - logits["heads"]).abs().max().item()}
    for runner in runners.values():  # compile and autotune every shape first
        runner.prefill(ids)
        if decode:
            runner.generate(prompts, 4)
    names = list(runners)
    prefill = {variant: [] for variant in names}
    steps = {variant: [] for variant in names}
    for turn in range(ROUNDS):
        for variant in names if turn % 2 == 0 else names[::-1]:
            runner = runners[variant]
            calls = []
            for _ in range(CALLS):
                torch.cuda.synchronize()
                start = time.perf_counter()
                runner.prefill(ids)
                torch.cuda.synchronize()
                calls.append(time.perf_counter() - start)
            prefill[variant].append(median(calls))
            if decode and turn < DECODE_ROUNDS:
                start = time.perf_counter()
                runner.generate(prompts, 1)
                torch.cuda.synchronize()
                one = time.perf_counter() - start
                start = time.perf_counter()
                runner.generate(prompts, families.NEW_TOKENS)
                torch.cuda.synchronize()
                steps[variant].append((time.perf_counter() - start - one) / (families.NEW_TOKENS - 1))
    for variant in names:
        figures[variant] = {"prefill_4x2048_ms_rounds": [round(t * 1e3, 3) for t in prefill[variant]],
                            "prefill_ratio_median": median(prefill[variant]) / median(prefill["source"]),
                            "prefill_ratio_min": min(prefill[variant]) / min(prefill["source"])}
        if decode:
            figures[variant][f"decode_b{families.DECODE_BATCH}_step_ms"] = round(median(steps[variant]) * 1e3, 3)
            figures[variant]["decode_ratio"] = median(steps[variant]) / median(steps["source"])
    families.log(f"{name}: {json.dumps(figures)}")
    del runners
    torch.cuda.empty_cache()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="a new folder for the models")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--old-rev", required=True, help="the git revision whose compressor/modeling files to compare")
    parser.add_argument("--families", default="gated_deltanet,qwen3_5,delta_net")
    parser.add_argument("--decode", action="store_true", help="also time greedy decoding at batch 16")
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"will not overwrite {args.out}")
    if args.work.exists() and any(args.work.iterdir()):
        parser.error(f"--work {args.work} is not empty; name a new folder")
    try:
        old_rev = git("rev-parse", "--verify", f"{args.old_rev}^{{commit}}").decode().strip()
        new_rev = git("rev-parse", "HEAD").decode().strip()
        dirty = bool(git("status", "--porcelain", "--", "compressor/modeling").strip())
    except subprocess.CalledProcessError:
        parser.error(f"--old-rev {args.old_rev} is not a commit of the repository at {ROOT}")
    import fla  # noqa: F401  (registers fla's model types with transformers)
    from bench_inference import versions

    import compressor

    compressor.register()
    results = {"versions": versions(), "old_rev": old_rev, "new_rev": new_rev,
               "new_modeling_files_differ_from_new_rev": dirty}
    for name in args.families.split(","):
        results[name] = compare(name, args.work, old_rev, args.decode)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
