"""Perplexity and copy-recall accuracy against state reduction for every way of choosing heads.

For the bundled fixture (or any supported model): state reductions 0.1 … 0.6 (and 0.389, the paper's budget) ×
every statistics rule at both ends, the loss-aware scorer at both ends, ``auto``, and ``random`` over several
seeds. Calibrates once (the statistics and loss scores serve every budget) and masks heads instead of slicing
them (``selection.masked_heads`` equals removal exactly), so each point costs one evaluation; identical plans are
evaluated once. Writes ``pruning_curve.csv``, ``pruning_curve.png`` and ``pruning_curve.md`` (the table at
0.389) to ``--out``.

    python scripts/pruning_curve.py            # the fixture, calib.txt, eval.txt, 2 CPU threads
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from compressor.budgets import make_budget  # noqa: E402
from compressor.calibration import collect_state_statistics  # noqa: E402
from compressor.calibration_text import read_text, token_windows  # noqa: E402
from compressor.evaluation import copy_recall, next_token_loss, recall_spans  # noqa: E402
from compressor.loading import load_model  # noqa: E402
from compressor.accounting import versions  # noqa: E402
from compressor.scoring import score_heads  # noqa: E402
from compressor.settings import SCORE_METHODS  # noqa: E402
from compressor.selection import choose_plan, loss_scores, loss_windows, masked_heads, split_windows  # noqa: E402
from compressor.layers import linear_layers  # noqa: E402

REDUCTIONS = (0.1, 0.2, 0.3, 0.389, 0.4, 0.5, 0.6)
RULES = tuple(m for m in SCORE_METHODS if m != "random") + ("loss",)
FIELDS = ("state_reduction", "method", "remove", "seed", "heads_removed", "state_reduction_reached", "perplexity",
          "recall_accuracy", "auto_chose")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "tests/fixtures/qwen35-tiny-6m"))
    parser.add_argument("--calib", default=str(ROOT / "compressor/data/python-docs-calib.txt"))
    parser.add_argument("--eval", default=str(ROOT / "compressor/data/python-docs-eval.txt"))
    parser.add_argument("--samples", type=int, default=8, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per calibration window")
    parser.add_argument("--eval-samples", type=int, default=8, help="evaluation windows, seeded (0: all)")
    parser.add_argument("--eval-seq-len", type=int, default=1024)
    parser.add_argument("--seeds", type=int, default=5, help="random draws per state reduction")
    parser.add_argument("--auto-holdout", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "scripts/results")
    return parser.parse_args()


def main() -> None:
    args = arguments()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    loaded = load_model(args.model, "cpu", "float32")
    model, family = loaded.model, loaded.family
    calibration = token_windows(loaded.tokenizer, read_text(args.calib)[0], args.samples, args.seq_len, 0)
    evaluation = token_windows(loaded.tokenizer, read_text(args.eval)[0], args.eval_samples or None,
                               args.eval_seq_len, 0)
    spans = recall_spans(evaluation)
    mixers = linear_layers(model, family)
    head_bytes = {i: m.head_k_dim * m.head_v_dim for i, m in mixers.items()}
    total_bytes = sum(head_bytes[i] * m.num_v_heads for i, m in mixers.items())

    # Once for every budget: what `prune --method <rule>` and `prune --method auto` compute before planning.
    stats = collect_state_statistics(model, family, calibration, progress=False)
    scoring_windows, held_out = split_windows(calibration, args.auto_holdout)
    auto_stats = collect_state_statistics(model, family, scoring_windows, progress=False)
    loss = loss_scores(model, family, loss_windows(calibration))
    auto_loss = loss_scores(model, family, loss_windows(scoring_windows))
    scores = {rule: loss if rule == "loss" else score_heads(stats, rule) for rule in RULES}
    calibrated = time.perf_counter() - started

    measured: dict[frozenset, tuple[float, float]] = {}

    def evaluate(kept: dict[int, list[int]]) -> tuple[float, float]:
        """(perplexity, recall accuracy) of the model with every head outside ``kept`` masked; cached by plan."""
        key = frozenset((layer, head) for layer, heads in kept.items() for head in heads)
        if key not in measured:
            with masked_heads(model, family, kept):
                measured[key] = (math.exp(next_token_loss(model, evaluation, progress=False)),
                                 copy_recall(model, spans))
        return measured[key]

    def row(reduction, method, remove, seed, kept, chose="") -> dict:
        perplexity, recall = evaluate(kept)
        freed = sum(head_bytes[i] * (m.num_v_heads - len(kept[i])) for i, m in mixers.items())
        return {"state_reduction": reduction, "method": method, "remove": remove, "seed": seed,
                "heads_removed": sum(m.num_v_heads - len(kept[i]) for i, m in mixers.items()),
                "state_reduction_reached": round(freed / total_bytes, 4), "perplexity": round(perplexity, 4),
                "recall_accuracy": round(recall, 4), "auto_chose": chose}

    everything = {i: list(range(m.num_v_heads)) for i, m in mixers.items()}
    rows = [row(0.0, "none", "", "", everything)]
    for reduction in REDUCTIONS:
        budget = make_budget("global", reduction)
        for rule in RULES:
            for end in ("high", "low"):
                rows.append(row(reduction, rule, end, "", budget.plan(scores[rule], head_bytes, end).kept))
        for seed in range(args.seeds):
            plan = budget.plan(score_heads(stats, "random", seed=seed), head_bytes, "high")
            rows.append(row(reduction, "random", "high", seed, plan.kept))
        chosen, _ = choose_plan(model, family, auto_stats, auto_loss, held_out, head_bytes, budget)
        chose = chosen.name + ("" if chosen.seed is None else f" (seed {chosen.seed})") + f", remove {chosen.remove}"
        rows.append(row(reduction, "auto", "", "", chosen.plan.kept, chose))
        print(f"state reduction {reduction}: done after {time.perf_counter() - started:.0f} s", flush=True)
    elapsed = time.perf_counter() - started

    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "pruning_curve.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out / "pruning_curve.png", loaded.source, evaluation)
    (args.out / "pruning_curve.md").write_text(table(rows, 0.389, args, calibration, evaluation, elapsed, calibrated,
                                                     len(measured)))
    print(table(rows, 0.389, args, calibration, evaluation, elapsed, calibrated, len(measured)))


def label(row: dict) -> str:
    return row["method"] if row["method"] in ("auto", "random", "none") else f"{row['method']} {row['remove']}"


def plot(rows: list[dict], path: Path, source: str, evaluation: torch.Tensor) -> None:
    """Two panels (perplexity, log scale; recall accuracy) against state reduction: one line per rule and end
    (solid: remove low, dashed: remove high), auto in black, random as its mean and min–max band."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = [r for r in rows if r["state_reduction"] not in (0.389,)]
    base = next(r for r in rows if r["method"] == "none")
    names = sorted({label(r) for r in curve if r["method"] not in ("none", "random", "auto")},
                   key=lambda name: (name.endswith("high"), name))
    colours = dict(zip(sorted(set(RULES)), plt.get_cmap("tab10").colors))
    figure, axes = plt.subplots(1, 2, figsize=(15, 6.2))
    for axis, metric, title in ((axes[0], "perplexity", "held-out perplexity (log scale; lower is better)"),
                                (axes[1], "recall_accuracy", "copy-recall accuracy (higher is better)")):
        for name in names:
            points = sorted((r["state_reduction"], r[metric]) for r in curve if label(r) == name)
            rule, end = name.rsplit(" ", 1)
            axis.plot(*zip(*[(0.0, base[metric]), *points]), color=colours[rule], lw=1.4,
                      ls="-" if end == "low" else "--", marker="o" if end == "low" else "x", ms=4, label=name)
        reductions = sorted({r["state_reduction"] for r in curve if r["method"] == "random"})
        draws = [[r[metric] for r in curve if r["method"] == "random" and r["state_reduction"] == x] for x in reductions]
        xs = [0.0, *reductions]
        axis.fill_between(xs, [base[metric], *map(min, draws)], [base[metric], *map(max, draws)], color="grey",
                          alpha=0.25, label=f"random, min–max of {len(draws[0])} seeds")
        axis.plot(xs, [base[metric], *[sum(d) / len(d) for d in draws]], color="grey", lw=2, label="random, mean")
        auto = sorted((r["state_reduction"], r[metric]) for r in curve if r["method"] == "auto")
        axis.plot(*zip(*[(0.0, base[metric]), *auto]), color="black", lw=2.4, marker="s", ms=5, label="auto")
        axis.set_xlabel("state reduction (share of recurrent-state bytes removed)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        if metric == "perplexity":
            axis.set_yscale("log")
            values = [r[metric] for r in rows]
            axis.set_yticks([t for t in (10, 15, 20, 25, 30, 40, 50, 60, 80, 100, 150, 200, 300, 500)
                             if min(values) * 0.9 <= t <= max(values) * 1.1])
            axis.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            axis.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        else:
            axis.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        axis.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    axes[1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9)
    figure.suptitle(f"Pruning {Path(source).name}: heads chosen by each rule, masked; "
                    f"{evaluation.shape[0]} × {evaluation.shape[1]} held-out tokens")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def table(rows, reduction, args, calibration, evaluation, elapsed, calibrated, plans) -> str:
    """Markdown: every method's figures at ``reduction``, best perplexity first, and the issue's two checks."""
    at = [r for r in rows if r["state_reduction"] == reduction]
    base = next(r for r in rows if r["method"] == "none")
    lines = [f"State reduction {reduction} (target; reached: see the column), perplexity on "
             f"{evaluation.shape[0]} × {evaluation.shape[1]} tokens of {Path(args.eval).name}, heads scored on "
             f"{calibration.shape[0]} × {calibration.shape[1]} tokens of {Path(args.calib).name}.", "",
             "| heads removed by | heads | state reduction | perplexity | copy recall |", "| --- | --- | --- | --- | --- |",
             f"| none | 0 | 0 | {base['perplexity']:.2f} | {base['recall_accuracy']:.1%} |"]
    for r in sorted(at, key=lambda r: r["perplexity"]):
        name = label(r) + (f" (seed {r['seed']})" if r["method"] == "random" else "")
        name += f" → chose {r['auto_chose']}" if r["auto_chose"] else ""
        lines.append(f"| {name} | {r['heads_removed']} | {r['state_reduction_reached']:.3f} | {r['perplexity']:.2f} "
                     f"| {r['recall_accuracy']:.1%} |")
    fixed = [r for r in at if r["method"] in RULES]
    rank_norm = [r for r in at if r["method"] in RULES and r["method"] != "loss"]
    randoms = [r for r in at if r["method"] == "random"]
    auto = next(r for r in at if r["method"] == "auto")
    best_loss = next(r["perplexity"] for r in at if (r["method"], r["remove"]) == ("loss", "low"))
    best_fixed = min(fixed, key=lambda r: r["perplexity"])
    best_rank_norm = min(rank_norm, key=lambda r: r["perplexity"])
    lines += ["",
              f"- auto {auto['perplexity']:.2f} vs the best fixed rule ({label(best_fixed)}) "
              f"{best_fixed['perplexity']:.2f}: {'at least as good' if auto['perplexity'] <= best_fixed['perplexity'] else 'worse'}; "
              f"vs random ({min(r['perplexity'] for r in randoms):.2f} – {max(r['perplexity'] for r in randoms):.2f}): "
              f"{'better than every draw' if auto['perplexity'] < min(r['perplexity'] for r in randoms) else 'not better than every draw'}.",
              f"- loss-aware (remove low) {best_loss:.2f} vs the best rank/norm rule ({label(best_rank_norm)}) "
              f"{best_rank_norm['perplexity']:.2f}: {'better' if best_loss < best_rank_norm['perplexity'] else 'not better'}.",
              f"- {len(rows)} points, {plans} distinct plans evaluated; calibration and loss scores {calibrated:.0f} s, "
              f"whole run {elapsed:.0f} s on {args.threads} CPU threads; torch {versions()['torch']}, "
              f"transformers {versions()['transformers']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
