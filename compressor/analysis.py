"""The ``compress analyze`` report: per-head summaries, a low-/high-rank split, consistency, figures, Markdown.

Heads are flattened layer-major: head j of the i-th linear-attention layer; NaN padding (layers with fewer heads
than the widest) is dropped everywhere.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .calibration import StateStatistics
from .metrics import METRICS
from .settings import CHUNK

GROUPS = ("low-rank", "high-rank")
CONSISTENCY_METRICS = ("threshold_rank", "nuclear_norm")
EARLY_STEP = 128
FIGURES = {
    "heatmap": "final_rank_heatmap.png",
    "curves": "rank_over_time.png",
    "histogram": "final_rank_histogram.png",
}


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of ``values`` [n], ties sharing their average rank: [n] float64."""
    values = values.double()
    order = values.argsort()
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(1, len(values) + 1, dtype=torch.float64)
    _, inverse = values.unique(return_inverse=True)
    sums = torch.zeros(int(inverse.max()) + 1, dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.bincount(inverse).double()
    return (sums / counts)[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Spearman rank correlation of ``a`` and ``b`` [n]; None when either is constant or n < 2."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = (ra.pow(2).sum() * rb.pow(2).sum()).sqrt()
    if len(a) < 2 or denominator == 0:
        return None
    return float((ra * rb).sum() / denominator)


def flat(stats: StateStatistics, values: torch.Tensor) -> torch.Tensor:
    """[layer, head] padded values -> [heads] in layer-major order."""
    return torch.cat([values[i, :h] for i, h in enumerate(stats.heads)])


def largest_gap_split(values: torch.Tensor) -> tuple[float | None, torch.Tensor]:
    """Split ``values`` [n] at the largest gap of log(1 + value) in sorted order.

    Returns (threshold on the value scale: the gap's midpoint in log space, mapped back; high [n] bool, True above
    the threshold). With fewer than two distinct values there is no gap: (None, all False).
    """
    logs = torch.log1p(values.double()).sort().values
    if len(logs) < 2 or logs[-1] == logs[0]:
        return None, torch.zeros(len(values), dtype=torch.bool)
    gap = int((logs[1:] - logs[:-1]).argmax())
    threshold = math.expm1(float(logs[gap] + logs[gap + 1]) / 2)
    return threshold, values.double() > threshold


def step_index(times: torch.Tensor, tokens: int) -> int:
    """Index of the boundary at ``tokens`` tokens, or of the first one after it (the last one if none)."""
    later = (times >= tokens).nonzero()
    return int(later[0]) if len(later) else len(times) - 1


def consistency(stats: StateStatistics, halves: tuple[StateStatistics, StateStatistics] | None) -> dict:
    """Spearman correlations of the heads' ordering, for threshold rank and nuclear norm:
    ``early_vs_final`` (values at t = 128 against the last step; None where the last step is the first at or
    after t = 128, which would compare a step with itself) and ``halves`` (time means on two disjoint halves of the
    calibration samples; None without halves)."""
    early = step_index(stats.times, EARLY_STEP)
    last = len(stats.times) - 1
    result = {"early_step_tokens": int(stats.times[early]), "final_step_tokens": int(stats.times[-1])}
    for name in CONSISTENCY_METRICS:
        series = stats.mean[name]  # [time, layer, head]
        result[name] = {
            "early_vs_final": None if early == last else spearman(flat(stats, series[early]), flat(stats, series[-1])),
            "halves": None if halves is None else spearman(
                *(flat(half, half.mean[name].mean(0)) for half in halves)
            ),
        }
    return result


def build_report(
    stats: StateStatistics, halves: tuple[StateStatistics, StateStatistics] | None = None
) -> dict:
    """Everything ``report.json`` holds: settings, per-head final and time-mean metrics with group labels, the
    stratification and the consistency figures."""
    mean_rank = flat(stats, stats.mean["threshold_rank"].mean(0))
    threshold, high = largest_gap_split(mean_rank)
    labels = [GROUPS[int(h)] for h in high]
    layers, offset = [], 0
    for i, layer in enumerate(stats.layers):
        heads = []
        for j in range(stats.heads[i]):
            heads.append({
                "head": j,
                "group": labels[offset + j],
                "final": {m: round(float(stats.mean[m][-1, i, j]), 6) for m in METRICS},
                "mean": {m: round(float(stats.mean[m][:, i, j].mean()), 6) for m in METRICS},
            })
        share = sum(h["group"] == "high-rank" for h in heads) / len(heads)
        layers.append({"layer": layer, "state_shape": list(stats.state_shapes[i]), "heads": heads,
                       "share": {"low-rank": round(1 - share, 6), "high-rank": round(share, 6)}})
        offset += stats.heads[i]
    return {
        "settings": {**stats.settings, "times": stats.times.tolist()},
        "layers": layers,
        "stratification": {
            "rule": "largest gap in sorted log(1 + time-mean threshold rank) over all heads; high-rank above it",
            "threshold_rank": None if threshold is None else round(threshold, 4),
            "heads": {"low-rank": labels.count("low-rank"), "high-rank": labels.count("high-rank")},
        },
        "consistency": consistency(stats, halves),
    }


def write_figures(stats: StateStatistics, report: dict, folder: Path) -> dict[str, str]:
    """Write the three PNGs of ``FIGURES`` into ``folder``; returns their file names by key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    final = stats.mean["threshold_rank"][-1]  # [layer, head], NaN padded
    figure, axes = plt.subplots(figsize=(max(4, 0.45 * final.shape[1] + 2), max(3, 0.35 * len(stats.layers) + 1.5)))
    image = axes.imshow(final.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    axes.set(xlabel="value head", ylabel="layer", title=f"Threshold rank at t = {int(stats.times[-1])}")
    axes.set_yticks(range(len(stats.layers)), [str(layer) for layer in stats.layers])
    figure.colorbar(image, ax=axes, label="threshold rank")
    figure.tight_layout()
    figure.savefig(folder / FIGURES["heatmap"], dpi=120)
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(8.5, 4.5))
    styles = {"low-rank": "-", "high-rank": "--"}
    palette = plt.get_cmap("tab10" if len(stats.layers) <= 10 else "tab20")
    few_steps = len(stats.times) <= 12
    times = stats.times.numpy()
    for i, layer in enumerate(report["layers"]):
        colour = palette(i % palette.N)
        for head in layer["heads"]:
            values = stats.mean["threshold_rank"][:, i, head["head"]].numpy()
            axes.plot(times, values, color=colour, linestyle=styles[head["group"]], alpha=0.75, linewidth=1,
                      marker="o" if few_steps else None, markersize=3)
            axes.annotate(f"{layer['layer']}.{head['head']}", (times[-1], values[-1]), xytext=(3, 0),
                          textcoords="offset points", fontsize=6, color=colour, va="center")
        axes.plot([], [], color=colour, label=f"layer {layer['layer']}")
    for group, style in styles.items():
        axes.plot([], [], color="black", linestyle=style, label=f"{group}: {report['stratification']['heads'][group]}")
    axes.set(xlabel="tokens seen", ylabel="threshold rank (mean over samples)", title="Threshold rank over time")
    if stats.settings.get("steps") == "log":
        axes.set_xscale("log", base=2)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)  # outside: never over a curve
    figure.tight_layout()
    figure.savefig(folder / FIGURES["curves"], dpi=120)
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(6.5, 4))
    axes.hist(flat(stats, final).numpy(), bins=30, color="tab:gray")
    threshold = report["stratification"]["threshold_rank"]
    if threshold is not None:
        axes.axvline(threshold, color="black", linestyle="--", label=f"split of time means ({threshold:.1f})")
        axes.legend()
    axes.set(xlabel=f"threshold rank at t = {int(stats.times[-1])}", ylabel="heads", title="Final threshold ranks")
    figure.tight_layout()
    figure.savefig(folder / FIGURES["histogram"], dpi=120)
    plt.close(figure)
    return dict(FIGURES)


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def steps_in_words(settings: dict) -> str:
    """When the states were measured, in words: ``every N tokens`` or ``64, 128, 256, … tokens`` (``--steps log``)."""
    steps = settings.get("steps", f"every {CHUNK} tokens")  # statistics older than --steps record none
    return "64, 128, 256, … tokens" if steps == "log" else steps


def render_markdown(report: dict, figures: dict[str, str]) -> str:
    """``report.md``: settings, stratification, consistency, per-layer tables and the embedded figures."""
    settings, strata, agreement = report["settings"], report["stratification"], report["consistency"]
    threshold = strata["threshold_rank"]
    early, final = agreement["early_step_tokens"], agreement["final_step_tokens"]
    over_time = (f"t = {early} vs t = {final}" if early < final
                 else f"over time (n/a: no step after t = {early}; raise --seq-len)")
    lines = [
        f"# State-rank analysis of {settings.get('model', 'the model')}",
        "",
        f"Calibration: {settings.get('samples')} samples × {settings.get('seq_len')} tokens from "
        f"{settings.get('source')}, seed {settings.get('seed')}; threshold rank counts σ_i > {settings.get('eps')}·σ_1; "
        f"states measured at {steps_in_words(report['settings'])} up to t = {agreement['final_step_tokens']}.",
        "",
        "## Low-rank and high-rank heads",
        "",
        f"Rule: {strata['rule']}. "
        + ("All heads have the same mean rank: no split." if threshold is None else
           f"Threshold: mean threshold rank {threshold:.2f}; {strata['heads']['low-rank']} low-rank and "
           f"{strata['heads']['high-rank']} high-rank heads."),
        "",
        "| layer | heads | low-rank share | high-rank share | mean rank (min … max) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for layer in report["layers"]:
        ranks = [h["mean"]["threshold_rank"] for h in layer["heads"]]
        lines.append(f"| {layer['layer']} | {len(ranks)} | {layer['share']['low-rank']:.0%} | "
                     f"{layer['share']['high-rank']:.0%} | {sum(ranks) / len(ranks):.1f} "
                     f"({min(ranks):.1f} … {max(ranks):.1f}) |")
    lines += [
        "",
        "## Consistency (Spearman correlation of the heads' ordering)",
        "",
        f"| metric | {over_time} | two disjoint halves of the samples |",
        "| --- | --- | --- |",
    ]
    for name in CONSISTENCY_METRICS:
        lines.append(f"| {name.replace('_', ' ')} | {_figure(agreement[name]['early_vs_final'])} | "
                     f"{_figure(agreement[name]['halves'])} |")
    lines += [
        "",
        "## Figures",
        "",
        f"![Final threshold rank per layer and head]({figures['heatmap']})",
        "",
        f"![Threshold rank over time, coloured by group]({figures['curves']})",
        "",
        f"![Histogram of final threshold ranks]({figures['histogram']})",
        "",
        "Per-head final and time-mean values of every metric are in `report.json`; the full time series "
        "(mean and standard deviation over samples) in `stats.safetensors`.",
        "",
    ]
    return "\n".join(lines)


def write_report(
    stats: StateStatistics, halves: tuple[StateStatistics, StateStatistics] | None, folder: Path
) -> dict:
    """Write ``report.json``, ``report.md`` and the figures into ``folder``; return the report."""
    report = build_report(stats, halves)
    figures = write_figures(stats, report, folder)
    (folder / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    (folder / "report.md").write_text(render_markdown(report, figures))
    return report


def score_percentiles(grid: torch.Tensor) -> torch.Tensor:
    """Each finite entry of ``grid`` [layer, head] replaced by its percentile (0-100) among them; NaN stays NaN."""
    finite = grid.isfinite()
    values = grid[finite]
    order = average_ranks(values)  # 1 … n, ties averaged
    result = torch.full_like(grid, float("nan"))
    result[finite] = (100 * (order - 1) / max(len(values) - 1, 1)).to(grid.dtype)
    return result


def write_card_figures(
    stats: StateStatistics, folder: Path, scores: dict[int, torch.Tensor], kept: dict[int, list[int]], method: str
) -> list[str]:
    """Write a model card's figures into ``folder/figures/``: the removed heads over the method's ``scores``
    (layer -> [H]) and the analysis figures of ``stats``; returns their paths relative to ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = folder / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    layers = sorted(scores)
    width = max(len(scores[layer]) for layer in layers)
    grid = torch.full((len(layers), width), float("nan"))
    for i, layer in enumerate(layers):
        grid[i, : len(scores[layer])] = scores[layer].float()
    grid = score_percentiles(grid)  # one outlier must not stretch the colours of all the others
    figure, axes = plt.subplots(figsize=(max(4, 0.45 * width + 2), max(3, 0.35 * len(layers) + 1.5)))
    image = axes.imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=100)
    for i, layer in enumerate(layers):
        for head in sorted(set(range(len(scores[layer]))) - set(kept[layer])):
            axes.text(head, i, "×", ha="center", va="center", color="white", fontsize=12, fontweight="bold")
    axes.set(xlabel="value head", ylabel="layer", title=f"Removed heads (×) over the {method} score")
    axes.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    figure.colorbar(image, ax=axes, label=f"{method} score, percentile among all heads")
    figure.tight_layout()
    figure.savefig(figures / "removed_heads.png", dpi=120)
    plt.close(figure)
    names = write_figures(stats, build_report(stats), figures)
    return ["figures/removed_heads.png", *(f"figures/{names[key]}" for key in FIGURES)]
