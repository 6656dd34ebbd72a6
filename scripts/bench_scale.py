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
against ``cp -r`` of the source folder on the same disk, and whether both output folders hold identical tensors.

    python scripts/bench_scale.py --size 8B --work /scratch/bench --json scripts/results/bench_scale_h200.json
    python scripts/bench_scale.py --size 60M --device cpu --work /tmp/bench --samples 2 --seq-len 256   # smoke
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

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
    setattr(module, name, wrapper)

for name in ("load", "measure", "choose"):
    timed(compressor.pipeline, name)
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


def run(source: Path, out: Path, settings: dict, calibration: dict) -> dict:
    """One prune in a fresh process; its stage times and peaks."""
    result = subprocess.run([sys.executable, "-c", CHILD, str(source), str(out), json.dumps(settings),
                             json.dumps(calibration)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-4000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def same_tensors(first: Path, second: Path) -> bool:
    """Whether two output folders hold the same tensor names and bytes (read one tensor at a time)."""
    from safetensors import safe_open

    def where(folder: Path) -> dict[str, Path]:
        found = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(file, "pt") as handle:
                found.update({name: file for name in handle.keys()})
        return found

    a, b = where(first), where(second)
    if sorted(a) != sorted(b):
        return False
    for name in a:
        with safe_open(a[name], "pt") as x, safe_open(b[name], "pt") as y:
            if not torch.equal(x.get_tensor(name), y.get_tensor(name)):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="8B", help="parameters of the synthetic model, e.g. 8B or 60M")
    parser.add_argument("--work", type=Path, required=True, help="a new folder on the disk to measure")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.work.exists() and any(args.work.iterdir()):
        parser.error(f"--work {args.work} is not empty; name a new folder (the script deletes its copy in it)")

    source = args.work / "source"
    start = time.perf_counter()
    parameters = write_source(source, config_for(parse_size(args.size)), args.device)
    written = time.perf_counter() - start
    source_bytes = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(source), str(args.work / "copy")], check=True)
    copy_s = time.perf_counter() - start
    shutil.rmtree(args.work / "copy")

    common = {"method": "norm", "state_reduction": 0.389, "device": args.device, "export": "stream", "verify": False}
    calibration = {"samples": args.samples, "seq_len": args.seq_len, "batch_size": 4}
    limit = f"{source_bytes // 4 // 1000}KB"
    memory = {"max_gpu_memory": limit} if args.device.startswith("cuda") else {"max_cpu_memory": limit}
    runs = {"whole": run(source, args.work / "whole", common, calibration),
            "layer_by_layer": run(source, args.work / "layer_by_layer", {**common, **memory}, calibration)}
    figures = {
        "size": args.size, "parameters": parameters, "source_bytes": source_bytes, "device": args.device,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "versions": {"torch": torch.__version__}, "write_source_s": written, "cp_r_s": copy_s,
        "memory_limit": limit, "runs": runs,
        "export_over_cp": {kind: r["stages_s"]["write_weights"] / copy_s for kind, r in runs.items()},
        "same_plan": runs["whole"]["kept"] == runs["layer_by_layer"]["kept"],
        "identical_tensors": same_tensors(args.work / "whole", args.work / "layer_by_layer"),
    }
    for r in runs.values():
        r.pop("kept")
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
