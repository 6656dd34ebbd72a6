"""Held-out perplexity and copy recall of the fixture after removing query/key channels (every key method at key
reductions 0.25 and 0.5), heads alone at the same state bytes, channels combined with heads, and ``--key-reduction
auto`` choosing between them (CPU).

    PYTHONPATH=. python scripts/key_channels_table.py [--out scripts/results/key_channels.md]

Each row is one ``compressor.pipeline.prune`` into a temporary folder (no reload check), evaluated on the embedded
held-out text before and after.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from compressor.pipeline import prune
from compressor.settings import KEY_METHODS, CalibrationSettings, EvalSettings, PruneSettings

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "qwen35-tiny-6m"


def runs() -> list[tuple[str, dict]]:
    rows = []
    for reduction in (0.25, 0.5):
        for method in KEY_METHODS:
            rows.append((f"channels {method} {reduction}", dict(key_reduction=reduction, key_method=method)))
        for method in ("norm", "loss"):
            rows.append((f"heads {method} {reduction}", dict(state_reduction=reduction, method=method)))
        rows.append((f"--key-reduction auto, heads loss, {reduction} in all",
                     dict(key_reduction="auto", state_reduction=reduction, method="loss")))
    for key_method in ("rrqr", "l1"):
        rows.append((f"channels {key_method} 0.25 + heads loss, 0.5 in all",
                     dict(key_reduction=0.25, key_method=key_method, state_reduction=0.5, method="loss")))
    return rows


def chosen(method) -> str:
    """What ``--key-reduction auto`` and ``--key-method auto`` chose, as ``split (channel method)``."""
    parts = []
    if method.axes_candidates:
        parts.append(min(method.axes_candidates, key=lambda c: c["loss"])["axes"])
    if method.key_chosen:
        parts.append(f"({method.key_chosen})" if parts else method.key_chosen)
    return " ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("scripts/results/key_channels.md"))
    args = parser.parse_args()
    calibration = CalibrationSettings(samples=8, seq_len=1024)
    evaluation = EvalSettings(samples=16, seq_len=512)
    lines = ["| run | state bytes after | perplexity | copy recall | auto chose | seconds |",
             "| --- | --- | --- | --- | --- | --- |"]
    before = None
    for name, options in runs():
        started = time.time()
        with tempfile.TemporaryDirectory() as folder:
            settings = PruneSettings(calibration=calibration, evaluation=evaluation, device="cpu", verify=False,
                                     **options)
            record = prune(str(FIXTURE), Path(folder) / "out", settings, progress=False).record
        if before is None:
            before = record
            lines.insert(2, f"| unpruned | {record.state_bytes_before:,} | {record.eval.perplexity_before:.2f} | "
                            f"{record.eval.recall_accuracy_before:.1%} | | |")
        lines.append(f"| {name} | {record.state_bytes_after:,} | {record.eval.perplexity_after:.2f} | "
                     f"{record.eval.recall_accuracy_after:.1%} | {chosen(record.method)} | "
                     f"{time.time() - started:.0f} |")
        print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
