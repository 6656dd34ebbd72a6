"""Healing curves on the bundled fixture: held-out perplexity and copy recall of pruned folders before and after
``compress heal`` with several token budgets, from calibration text and from teacher samples.

    # the pruned folders, with the command line (CPU):
    for spec in "loss-low loss low" "joint-high joint high" "random random low"; do set -- $spec
      compress prune tests/fixtures/qwen35-tiny-6m --out /tmp/heal/$1 --state-reduction 0.389 \\
        --method $2 --remove $3 --device cpu; done
    # the settings sweep that chose the defaults, and the training step against a forward pass (H200, 2026-12-02):
    python scripts/heal_curve.py --pruned /tmp/heal --plans loss-low --tokens 1000000 --sweep --speed \
        --device cuda --json scripts/results/heal_curve_sweep.json
    # the curve, as run (H200, four processes side by side on the one GPU, then merged; the 4M-token runs of
    # joint-high and random, and loss-low's from teacher samples, in five processes side by side in a later lease):
    C="python scripts/heal_curve.py --pruned /tmp/heal --device cuda --no-report --set teacher_dtype=float32 \
       --set sample_batch_size=256"
    $C --plans loss-low --data calib --tokens 250000,1000000,4000000 --json c1.json &
    $C --plans loss-low --data teacher --tokens 250000,1000000,4000000 --json c2.json &
    $C --plans joint-high --data calib,teacher --tokens 250000,1000000 --json c3.json &
    $C --plans random --data calib,teacher --tokens 250000,1000000 --json c4.json & wait
    python scripts/heal_curve.py --merge c1.json c2.json c3.json c4.json --json scripts/results/heal_curve.json
    # the later lease (OMP_NUM_THREADS=3), then merged into the curve:
    $C --plans loss-low --data teacher --tokens 4000000 --json h1.json &
    $C --plans joint-high --data calib --tokens 4000000 --json h2.json &   # and so on for joint-high teacher,
    wait                                                                    # random calib, random teacher
    python scripts/heal_curve.py --merge scripts/results/heal_curve.json h1.json h2.json ... --json heal_curve.json
    # CPU wall time of one run (2 cores, one thread):
    OMP_NUM_THREADS=1 python scripts/heal_curve.py --pruned /tmp/heal --plans loss-low --data calib \
        --tokens 250000 --device cpu --set curve_points=2 --json scripts/results/heal_curve_cpu.json
    # the table, CSV and figure of a JSON:
    python scripts/heal_curve.py --report scripts/results/heal_curve.json

Each run writes its healed folder to a temporary folder (removed after) and appends one row per run to the JSON
(written after every run, so a run cut short keeps what it finished). ``--report`` turns the JSON into
``<stem>.md``, ``<stem>.csv`` and ``<stem>.png`` beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURE = ROOT / "tests" / "fixtures" / "qwen35-tiny-6m"
SWEEP = [  # (name, settings): the candidates for the defaults
    ("lora r16 all lr1e-3", dict(lora_rank=16, train="all", lr=1e-3)),
    ("lora r64 all lr1e-3", dict(lora_rank=64, train="all", lr=1e-3)),
    ("lora r16 linear lr1e-3", dict(lora_rank=16, train="linear", lr=1e-3)),
    ("full linear lr3e-4", dict(lora_rank=0, train="linear", lr=3e-4)),
    ("full linear lr1e-3", dict(lora_rank=0, train="linear", lr=1e-3)),
    ("full all lr1e-4", dict(lora_rank=0, train="all", lr=1e-4)),
    ("full all lr3e-4", dict(lora_rank=0, train="all", lr=3e-4)),
    ("full all lr3e-4 +lm0.5", dict(lora_rank=0, train="all", lr=3e-4, lm_weight=0.5)),
]


def environment() -> dict:
    import importlib.metadata

    import torch

    found = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
             "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
             "torch_threads": torch.get_num_threads()}
    for name in ("torch", "transformers", "peft", "flash-linear-attention", "triton"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def save(path: Path, rows: list[dict], extra: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**extra, "rows": rows}, indent=1) + "\n")


def heal_once(pruned: Path, teacher: str, overrides: dict, device: str) -> dict:
    from compressor.heal import HealSettings, heal_folder

    settings = HealSettings(device=device, **overrides)
    with tempfile.TemporaryDirectory(prefix="heal-curve-") as work:
        started = time.perf_counter()
        record = heal_folder(pruned, teacher, Path(work) / "out", settings, progress=False)
        wall = time.perf_counter() - started
    recovery = record.recovery
    figures = recovery["eval"]
    return {
        "plan": pruned.name, "data": settings.data, "tokens": recovery["tokens"], "train": settings.train,
        "lora_rank": settings.lora_rank, "lr": settings.lr, "lm_weight": settings.lm_weight,
        "perplexity_teacher": figures["perplexity_teacher"], "perplexity_before": figures["perplexity_before"],
        "perplexity_after": figures["perplexity_after"], "gap_recovered": figures["gap_recovered"],
        "recall_teacher": figures["recall_accuracy_teacher"], "recall_before": figures["recall_accuracy_before"],
        "recall_after": figures["recall_accuracy_after"], "kl_before": recovery["kl_before"],
        "kl_after": recovery["kl_after"], "held_out_loss_before": recovery["loss_before"],
        "held_out_loss_after": recovery["loss_after"], "curve": recovery["curve"],
        "train_seconds": recovery["train_seconds"], "sampling_seconds": recovery["sampling_seconds"],
        "wall_seconds": round(wall, 2), "device": recovery["device"],
    }


def speed(pruned: Path, device: str, batch: int = 8, seq_len: int = 512, repeat: int = 10) -> dict:
    """Seconds of a forward pass (default dispatch: fla on CUDA when installed), a forward pass through the PyTorch
    recurrence, and a training step (forward + backward, PyTorch recurrence) of the pruned model."""
    import torch

    from compressor.heal.losses import distillation_loss
    from compressor.recurrences import torch_recurrences
    from compressor.loading import load_model

    loaded = load_model(str(pruned), device, "float32")
    model = loaded.model
    ids = torch.randint(model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(model.device)
    teacher = load_model(str(FIXTURE), device, "float32").model.eval()

    def sync():
        if model.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> float:
        fn()
        sync()
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - started)
        return sorted(times)[len(times) // 2]

    def forward():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    def forward_torch():
        with torch_recurrences():
            forward()

    def step():
        model.train()
        with torch_recurrences():
            kl, _ = distillation_loss(model, ids, teacher)
            kl.backward()
        model.zero_grad(set_to_none=True)
        model.eval()

    result = {"batch": batch, "seq_len": seq_len, "device": str(model.device),
              "forward_default_s": timed(forward), "forward_torch_s": timed(forward_torch),
              "train_step_torch_s": timed(step)}
    try:  # fla's own backward, where fla is installed: does it run here?
        from compressor.modeling import gated_delta

        if model.device.type == "cuda" and gated_delta.HAS_FLA:
            model.train()
            kl, _ = distillation_loss(model, ids, teacher)
            kl.backward()
            sync()
            result["fla_backward"] = "ran"
    except Exception as error:  # noqa: BLE001  (reported, not hidden)
        result["fla_backward"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}"
    result["train_step_over_forward"] = result["train_step_torch_s"] / result["forward_default_s"]
    return result


def report(path: Path) -> None:
    """``<stem>.md`` (table), ``<stem>.csv`` and ``<stem>.png`` (perplexity against tokens) from the JSON."""
    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if "perplexity_after" in r]
    columns = ["plan", "data", "tokens", "train", "lora_rank", "lr", "perplexity_teacher", "perplexity_before",
               "perplexity_after", "gap_recovered", "recall_teacher", "recall_before", "recall_after", "kl_before",
               "kl_after", "train_seconds", "sampling_seconds", "wall_seconds", "device"]
    lines = [",".join(columns)]
    for row in rows:
        lines.append(",".join("" if row.get(c) is None else str(row.get(c)) for c in columns))
    path.with_suffix(".csv").write_text("\n".join(lines) + "\n")

    table = ["| plan | data | tokens | training | ppl before → after (teacher) | gap recovered | copy recall before → "
             "after (teacher) | held-out KL before → after | wall s (train, sampling) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        training = f"LoRA r{r['lora_rank']} {r['train']}" if r["lora_rank"] else f"full {r['train']}"
        training += f", lr {r['lr']:g}" + (f", +{r['lm_weight']:g} LM" if r.get("lm_weight") else "")
        sampling = f", {r['sampling_seconds']:.0f}" if r.get("sampling_seconds") else ""
        table.append(
            f"| {r['plan']} | {r['data']} | {r['tokens'] / 1e6:.2f}M | {training} | {r['perplexity_before']:.2f} → "
            f"**{r['perplexity_after']:.2f}** ({r['perplexity_teacher']:.2f}) | {100 * r['gap_recovered']:.0f} % | "
            f"{100 * r['recall_before']:.1f} → {100 * r['recall_after']:.1f} % ({100 * r['recall_teacher']:.1f} %) | "
            f"{r['kl_before']:.4f} → {r['kl_after']:.4f} | {r['wall_seconds']:.0f} ({r['train_seconds']:.0f}{sampling}) |")
    header = [f"# {path.stem}", "", f"Environment: `{json.dumps(data.get('environment', {}))}`", ""]
    if data.get("speed"):
        header += [f"Speed: `{json.dumps(data['speed'])}`", ""]
    path.with_suffix(".md").write_text("\n".join(header + table) + "\n")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    groups = {}
    for r in rows:
        groups.setdefault((r["plan"], r["data"]), []).append(r)
    if not groups:
        return
    figure, axis = plt.subplots(figsize=(7, 4.5))
    teacher = rows[0]["perplexity_teacher"]
    for (plan, source), members in sorted(groups.items()):
        members.sort(key=lambda r: r["tokens"])
        xs = [0.0] + [r["tokens"] / 1e6 for r in members]
        ys = [members[0]["perplexity_before"]] + [r["perplexity_after"] for r in members]
        axis.plot(xs, ys, marker="o", linestyle="-" if source == "calib" else "--", label=f"{plan}, {source}")
    axis.axhline(teacher, color="black", linewidth=0.8, label=f"unpruned ({teacher:.2f})")
    axis.set_xscale("symlog", linthresh=0.25)
    axis.set_yscale("log")
    axis.set_xlabel("healing tokens (millions)")
    axis.set_ylabel("held-out perplexity")
    axis.set_title("qwen35-tiny-6m, state reduction 0.389: healing by distillation")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path.with_suffix(".png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pruned", type=Path, default=Path("/tmp/heal"), help="Folder of the pruned folders.")
    parser.add_argument("--plans", default="loss-low,joint-high,random")
    parser.add_argument("--data", default="calib,teacher")
    parser.add_argument("--tokens", default="250000,1000000")
    parser.add_argument("--teacher", default=str(FIXTURE))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=ROOT / "scripts" / "results" / "heal_curve.json")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="HealSettings field for every run (e.g. lr=3e-4, lora_rank=0, train=all).")
    parser.add_argument("--sweep", action="store_true", help="Run the settings sweep instead of the curve.")
    parser.add_argument("--speed", action="store_true", help="Time a training step against a forward pass first.")
    parser.add_argument("--report", type=Path, default=None, help="Only write the table/CSV/figure of this JSON.")
    parser.add_argument("--append", action="store_true", help="Add to the rows already in --json.")
    parser.add_argument("--no-report", action="store_true", help="Write the JSON only.")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, help="Merge these JSONs into --json.")
    args = parser.parse_args()
    if args.report is not None:
        report(args.report)
        return
    if args.merge:
        parts = [json.loads(path.read_text()) for path in args.merge]
        merged = {}  # what the files share, from the first that has it; every run's own environment beside
        for part in parts:
            merged.update({key: value for key, value in part.items() if key not in ("rows", *merged) and value})
        environments = [part["environment"] for part in parts if part.get("environment")]
        if any(environment != environments[0] for environment in environments):
            merged["environments"] = environments
        rows = [row for part in parts for row in part["rows"]]
        plans = list(dict.fromkeys(row["plan"] for row in rows))  # by plan as first met, data, tokens
        rows.sort(key=lambda row: (plans.index(row["plan"]), row["data"], row["tokens"]))
        save(args.json, rows, merged)
        report(args.json)
        return

    import torch

    torch.set_num_threads(torch.get_num_threads())
    overrides = {}
    for item in args.set:
        name, _, value = item.partition("=")
        try:
            overrides[name] = json.loads(value)
        except ValueError:
            overrides[name] = value
    existing = json.loads(args.json.read_text()) if args.append and args.json.is_file() else {}
    rows = existing.get("rows", [])
    extra = {"environment": environment(), "date": time.strftime("%Y-%m-%d"), "settings": overrides,
             "speed": existing.get("speed")}
    if args.speed:
        extra["speed"] = speed(args.pruned / args.plans.split(",")[0], args.device)
        print(json.dumps(extra["speed"]), flush=True)
        save(args.json, rows, extra)
    runs = []
    if args.sweep:
        for name, settings in SWEEP:
            runs.append((args.plans.split(",")[0], {"data": "calib", "tokens": int(args.tokens.split(",")[-1]),
                                                    **overrides, **settings}, name))
    else:
        for plan in args.plans.split(","):
            for source in args.data.split(","):
                for tokens in args.tokens.split(","):
                    runs.append((plan, {**overrides, "data": source, "tokens": int(tokens)}, None))
    for plan, settings, name in runs:
        row = heal_once(args.pruned / plan, args.teacher, settings, args.device)
        if name:
            row["config"] = name
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
        save(args.json, rows, extra)
    if not args.no_report:
        report(args.json)


if __name__ == "__main__":
    main()
