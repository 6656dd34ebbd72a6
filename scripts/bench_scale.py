"""Pruning a model that does not fit on the device: whole-model against layer by layer, on one synthetic checkpoint.

Writes a random Qwen3-Next-shaped checkpoint of about ``--size`` parameters in bf16 (the 80B model's layer layout:
every 4th layer full attention, 16 key x 32 value heads of 128, MoE MLPs with 512-wide experts; the number of
experts and layers scaled to the size), then prunes it at 0.389 with ``--method norm`` twice, each run in a fresh
process:

- ``whole``: the model loaded on the device, exported shard by shard (``--export stream``);
- ``layer_by_layer``: ``--max-gpu-memory`` (``--max-cpu-memory`` on the CPU) at a quarter of the model's size.

Measures, and prints as one JSON object (also written to ``--json``): the wall time of each stage (load, calibrate
and measure, choose, write the folder, of which the weights), the peak device memory (CUDA's
``max_memory_allocated``), the peak RSS (VmHWM), the export's time
against ``cp -r`` of the source folder on the same disk, whether both runs measured the same statistics and plan,
and whether both output folders hold identical tensors (compared by per-tensor SHA-256, each output deleted once
hashed, so that the disk holds the source and one more copy at a time). On a GPU a smaller model with the same heads
is pruned first (``--warmup``), so that the runs measured find Triton's caches warm. The JSON is rewritten after
every step and each prune's stderr goes to a log beside it (STEM.KIND.log); ``--deadline`` stops a prune that would
overrun it. ``total_s`` of a run is its ``prune()`` call, imports excluded.

    PYTHONPATH=. python scripts/bench_scale.py --size 8B --work /root/bench --deadline 420 --json $OUT/bench_scale.json
    python scripts/bench_scale.py --size 60M --device cpu --work /tmp/bench --samples 2 --seq-len 256   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from compressor.accounting import versions

STARTED = time.perf_counter()
CHILD = r"""
import json, sys, time
from pathlib import Path
import torch
import compressor.pipeline, compressor.streaming
from compressor.pipeline import prune
from compressor.settings import CalibrationSettings, PruneSettings

stages = {}

def timed(module, name):
    original = getattr(module, name)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            stages[name] = stages.get(name, 0.0) + time.perf_counter() - start
            print(f"  {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    setattr(module, name, wrapper)

for name in ("load", "measure", "choose"):
    timed(compressor.pipeline, name)
measure = compressor.pipeline.measure
def measured(*args, **kwargs):  # the statistics, saved (outside the stage's time) for the comparison of the runs
    result = measure(*args, **kwargs)
    result.stats.save(Path(sys.argv[5]))
    return result
compressor.pipeline.measure = measured
timed(compressor.pipeline, "write_folder")  # the whole folder: weights, config, card and its figures
timed(compressor.streaming, "write_weights")  # the weights alone, shard by shard
settings = PruneSettings(**json.loads(sys.argv[3]), calibration=CalibrationSettings(**json.loads(sys.argv[4])))
start = time.perf_counter()
result = prune(sys.argv[1], sys.argv[2], settings, progress=False)
total = time.perf_counter() - start
peak_rss = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"stages_s": stages, "total_s": total, "peak_rss_bytes": peak_rss,
                  "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
                  "layer_by_layer": next(result.model.parameters()).device.type == "meta",
                  "kept": {str(k): v for k, v in result.plan.kept.items()}}))
"""


def parse_size(text: str) -> int:
    """'8B' -> 8e9 parameters, '60M' -> 6e7."""
    units = {"B": 10**9, "M": 10**6}
    return int(float(text[:-1]) * units[text[-1].upper()])


def config_for(parameters: int) -> dict:
    """A Qwen3-Next config (hidden 2048, the 80B model's heads) whose experts and layers give about ``parameters``."""
    layers = 48 if parameters >= 4 * 10**9 else 8
    vocab = 151936 if parameters >= 10**9 else 8192  # a small smoke model: the embeddings would dominate it
    per_layer = parameters / layers - 0.04e9 * (layers == 48)  # attention, linear attention and the router
    experts = max(4, int(per_layer / (3 * 512 * 2048)))
    return {
        "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "dtype": "bfloat16",
        "hidden_size": 2048, "num_hidden_layers": layers, "full_attention_interval": 4, "head_dim": 256,
        "num_attention_heads": 16, "num_key_value_heads": 2, "partial_rotary_factor": 0.25,
        "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
        "linear_num_key_heads": 16, "linear_num_value_heads": 32, "intermediate_size": 5120,
        "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "num_experts": experts,
        "num_experts_per_tok": min(10, experts), "decoder_sparse_step": 1, "mlp_only_layers": [],
        "norm_topk_prob": True, "vocab_size": vocab, "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
        "rope_theta": 10000000, "tie_word_embeddings": False,
    }


def write_source(folder: Path, config: dict, device: str, shard_bytes: int = 4 * 2**30) -> int:
    """The checkpoint of ``config`` with random bf16 weights (std 0.02; norms 1, A_log and dt_bias as initialised
    by transformers' scale), in the names and per-expert layout a Qwen3-Next checkpoint has, ``shard_bytes`` per
    file, and the fixture's tokenizer. Returns the number of parameters."""
    from safetensors.torch import save_file
    from transformers.core_model_loading import revert_weight_conversion

    from compressor.loading import load_structure

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    model = load_structure(str(folder)).model
    meta = {name: torch.empty(t.shape, dtype=torch.bfloat16, device="meta") for name, t in model.state_dict().items()
            if not name.endswith("inv_freq")}
    tensors = revert_weight_conversion(model, meta)
    generator = torch.Generator(device).manual_seed(0)
    shard, size, index, count, files = {}, 0, {}, 0, 0
    for name, tensor in tensors.items():
        if name.endswith(("norm.weight", "layernorm.weight")):
            value = torch.ones(tensor.shape, dtype=torch.bfloat16)
        else:
            value = (torch.randn(tensor.shape, generator=generator, device=device) * 0.02).to(torch.bfloat16).cpu()
        shard[name] = value
        size += value.numel() * 2
        count += value.numel()
        if size >= shard_bytes:
            files += 1
            save_file(shard, folder / f"model-{files:05d}.safetensors", metadata={"format": "pt"})
            index.update({n: f"model-{files:05d}.safetensors" for n in shard})
            shard, size = {}, 0
    if shard:
        files += 1
        save_file(shard, folder / f"model-{files:05d}.safetensors", metadata={"format": "pt"})
        index.update({n: f"model-{files:05d}.safetensors" for n in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    fixture = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "qwen35-tiny-6m"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(fixture / name, folder / name)
    return count


def run(source: Path, out: Path, settings: dict, calibration: dict, log: Path, timeout: float | None) -> dict:
    """One prune in a fresh process; its stage times and peaks, or {"error": ...} (a failure or ``timeout`` seconds
    passed): the next steps still run and report. Its stderr goes to ``log``; its statistics to ``out``_stats."""
    say(f"prune -> {out.name} (log {log}, timeout {timeout and round(timeout)} s)")
    start = time.perf_counter()
    with open(log, "w") as errors:
        try:
            result = subprocess.run([sys.executable, "-c", CHILD, str(source), str(out), json.dumps(settings),
                                     json.dumps(calibration), str(out.parent / f"{out.name}_stats")],
                                    stdout=subprocess.PIPE, stderr=errors, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            failed = {"error": f"timed out after {time.perf_counter() - start:.0f} s"}
        else:
            failed = None if result.returncode == 0 else {"error": f"exit status {result.returncode}"}
    if failed is None:
        try:
            figures = json.loads(result.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            failed = {"error": f"no figures on stdout: {result.stdout[-500:]!r}"}
    if failed is not None:
        failed["stderr_tail"] = log.read_text()[-3000:]
        say(f"{out.name}: {failed['error']}\n{failed['stderr_tail']}")
        for staging in out.parent.glob(f".{out.name}.partial-*"):  # a killed prune leaves its staging folder
            shutil.rmtree(staging, ignore_errors=True)
        return failed
    say(f"{out.name}: {figures['total_s']:.1f} s {figures['stages_s']}")
    return figures


def say(text: str) -> None:
    print(f"[bench_scale {time.perf_counter() - STARTED:6.1f} s] {text}", file=sys.stderr, flush=True)


def timed(step: str, figures: dict, call, *args):
    """``call(*args)``, its seconds recorded as ``figures[step]``."""
    start = time.perf_counter()
    result = call(*args)
    figures[step] = time.perf_counter() - start
    say(f"{step}: {figures[step]:.1f} s")
    return result


def tensor_digests(folder: Path) -> dict[str, list]:
    """Tensor name -> [dtype, shape, sha256 of its bytes] for every safetensors file of ``folder`` (read from the
    headers' byte ranges, the files in parallel), so that an output can be compared after it is deleted."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    from compressor.streaming import stored_layout

    def of_file(file: Path) -> dict[str, list]:
        found = {}
        with open(file, "rb") as handle:
            for name, entry in sorted(stored_layout(file).items(), key=lambda item: item[1].start):
                digest, left = hashlib.sha256(), entry.stop - entry.start
                handle.seek(entry.start)
                while left:
                    block = handle.read(min(left, 2**24))
                    if not block:
                        raise OSError(f"{file} ends inside {name}")
                    digest.update(block)
                    left -= len(block)
                found[name] = [entry.dtype, list(entry.shape), digest.hexdigest()]
        return found

    digests = {}
    with ThreadPoolExecutor(8) as pool:
        for found in pool.map(of_file, sorted(folder.glob("*.safetensors"))):
            digests.update(found)
    return digests


def compare_digests(first: dict, second: dict) -> dict:
    names = set(first) | set(second)
    differing = sorted(name for name in names if first.get(name) != second.get(name))
    return {"identical_tensors": bool(first) and not differing, "tensors": len(names), "differing": len(differing),
            "differing_first": differing[:5]}


def compare_statistics(first: Path, second: Path) -> dict:
    """Whether two runs' state statistics are equal (the mean and spread of every metric, and the token counts), and
    by how much each mean differs (relative to its scale)."""
    from compressor.calibration import StateStatistics

    a, b = StateStatistics.load(first), StateStatistics.load(second)
    pairs = [(a.times, b.times)] + [(getattr(a, part)[name], getattr(b, part)[name])
                                    for part in ("mean", "std") for name in a.mean]
    differences = {}
    for name in a.mean:
        x, y = a.mean[name].nan_to_num(), b.mean[name].nan_to_num()
        differences[name] = float((x - y).abs().max() / x.abs().max().clamp_min(1e-30))
    return {"bit_for_bit": all(torch.equal(x.nan_to_num(), y.nan_to_num()) for x, y in pairs),
            "max_relative_difference_of_means": differences}


def kept_difference(first: dict, second: dict) -> int:
    """Value heads kept by one plan and not the other."""
    return sum(len(set(first.get(layer, [])) ^ set(second.get(layer, []))) for layer in set(first) | set(second))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="8B", help="parameters of the synthetic model, e.g. 8B or 60M")
    parser.add_argument("--work", type=Path, required=True, help="a new folder on the disk to measure")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--json", type=Path, default=None, help="figures, rewritten after every step; the children's "
                                                               "logs go beside it (STEM.KIND.log)")
    parser.add_argument("--warmup", default=None, metavar="SIZE",
                        help="first prune a model of this size with the same heads and windows (e.g. 60M), so that "
                             "the runs measured find Triton's caches warm [default: 60M on a GPU, none on the CPU]")
    parser.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                        help="from the script's start: a prune that would run past it is stopped (or not started) "
                             "and the figures so far are reported")
    parser.add_argument("--keep-outputs", action="store_true",
                        help="keep both output folders (3x the model on disk; otherwise each is hashed and deleted)")
    args = parser.parse_args()
    if args.work.exists() and any(args.work.iterdir()):
        parser.error(f"--work {args.work} is not empty; name a new folder (the script deletes its copy in it)")
    warmup = args.warmup if args.warmup is not None else ("60M" if args.device.startswith("cuda") else "")
    logs = {kind: (args.json.parent / f"{args.json.stem}.{kind}.log" if args.json is not None
                   else args.work / f"{kind}.log") for kind in ("warmup", "whole", "layer_by_layer")}
    taken = [str(path) for path in [*logs.values(), *([args.json] if args.json else [])] if path.exists()]
    if taken:
        parser.error(f"will not overwrite {', '.join(taken)}: the script writes its figures and logs there (move "
                     "them or choose another --json)")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
    size = parse_size(args.size)
    needed = (3 if args.keep_outputs else 2) * 2.1 * size + 2**30  # bf16: the source and a copy or an output
    free = shutil.disk_usage(args.work).free
    figures = {"size": args.size, "device": args.device, "free_disk_bytes": free, "samples": args.samples,
               "seq_len": args.seq_len}

    def report() -> None:
        if args.json is not None:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")

    if free < needed:
        figures["error"] = f"{args.work} has {free / 1e9:.1f} GB free, about {needed / 1e9:.1f} GB are needed"
        report()
        raise SystemExit(figures["error"])
    figures["gpu"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    figures["versions"] = {"torch": torch.__version__, **versions()}
    common = {"method": "norm", "state_reduction": 0.389, "device": args.device, "export": "stream", "verify": False}
    calibration = {"samples": args.samples, "seq_len": args.seq_len, "batch_size": 4}

    def left() -> float | None:
        return None if args.deadline is None else args.deadline - (time.perf_counter() - STARTED)

    if warmup:  # the same head shapes and windows: the same Triton kernels and autotuning keys
        folder = args.work / "warmup"
        timed("warmup_write_source_s", figures, write_source, folder / "source", config_for(parse_size(warmup)),
              args.device)
        figures["warmup"] = run(folder / "source", folder / "out", common, calibration, logs["warmup"], left())
        figures["warmup"].pop("kept", None)
        shutil.rmtree(folder)
        report()

    source = args.work / "source"
    figures["parameters"] = timed("write_source_s", figures, write_source, source, config_for(size), args.device)
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()  # the children measure their own peaks; this process keeps no blocks
    figures["source_bytes"] = source_bytes = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    timed("sync_before_cp_s", figures, os.sync)  # the copy does not wait for the source's writeback
    timed("cp_r_s", figures, lambda: subprocess.run(["cp", "-r", str(source), str(args.work / "copy")], check=True))
    shutil.rmtree(args.work / "copy")
    report()

    limit = f"{source_bytes // 4 // 1000}KB"
    memory = {"max_gpu_memory": limit} if args.device.startswith("cuda") else {"max_cpu_memory": limit}
    figures["memory_limit"] = limit
    runs, digests = {}, {}
    figures["runs"] = runs
    for kind, settings in (("whole", common), ("layer_by_layer", {**common, **memory})):
        timed(f"sync_before_{kind}_s", figures, os.sync)
        remaining = left()
        if remaining is not None and remaining < 60:
            runs[kind] = {"error": f"not started: {remaining:.0f} s left before --deadline"}
            say(f"{kind}: {runs[kind]['error']}")
            continue
        runs[kind] = run(source, args.work / kind, settings, calibration, logs[kind],
                         None if remaining is None else remaining - 20)
        if "error" not in runs[kind]:
            runs[kind]["export_over_cp"] = runs[kind]["stages_s"]["write_weights"] / figures["cp_r_s"]
            digests[kind] = timed(f"digest_{kind}_s", figures, tensor_digests, args.work / kind)
            if not args.keep_outputs:
                shutil.rmtree(args.work / kind)
        report()
    if len(digests) == 2:
        whole, layered = runs["whole"].pop("kept"), runs["layer_by_layer"].pop("kept")
        figures["same_plan"] = whole == layered
        figures["heads_kept_differently"] = kept_difference(whole, layered)
        figures["statistics"] = compare_statistics(args.work / "whole_stats", args.work / "layer_by_layer_stats")
        figures.update(compare_digests(digests["whole"], digests["layer_by_layer"]))
    for figure in runs.values():
        figure.pop("kept", None)
    figures["total_s"] = time.perf_counter() - STARTED
    report()
    print(json.dumps(figures, indent=2))



if __name__ == "__main__":
    main()
