"""GPU checks and figures, run on the device machine: fla (GPU) against the PyTorch path (CPU), exactness on
CUDA, the fixture's perplexity under every rule, and the cost of state capture on a 1B-class model.

    python scripts/gpu_check.py --out results.json [--small]

Prints and writes a JSON of everything it measured, with the device and package versions.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import compressor  # noqa: E402
from bench_inference import timed  # noqa: E402  (this folder is on sys.path when a script runs)
from compressor.calibration import collect_state_statistics  # noqa: E402
from compressor.calibration_text import read_text, token_windows  # noqa: E402
from compressor.evaluation import perplexity  # noqa: E402
from compressor.families import family_for  # noqa: E402
from compressor.loading import load_model  # noqa: E402
from compressor.accounting import versions  # noqa: E402
from compressor.pipeline import prune  # noqa: E402
from compressor.settings import EvalSettings, PruneSettings  # noqa: E402
from compressor.budgets import plan_by_budget  # noqa: E402
from compressor.scoring import score_heads  # noqa: E402
from compressor.layers import PruningPlan, linear_layers  # noqa: E402
from compressor.slicing import slim  # noqa: E402

compressor.register()  # the shipped classes, which route CPU tensors away from fla

FIXTURE = ROOT / "tests" / "fixtures" / "qwen35-tiny-6m"
EVAL = ROOT / "compressor" / "data" / "python-docs-eval.txt"


def gpu_versus_cpu(samples: int, seq_len: int) -> dict:
    """The same fixture, float32: CPU (PyTorch recurrence) against CUDA (fla kernels)."""
    cpu = load_model(str(FIXTURE), device="cpu", dtype="float32")
    gpu = load_model(str(FIXTURE), device="cuda", dtype="float32")
    tokens = token_windows(cpu.tokenizer, read_text(None)[0], samples, seq_len, seed=0)
    with torch.no_grad():
        logits_cpu = cpu.model(tokens[:2]).logits
        logits_gpu = gpu.model(tokens[:2].cuda()).logits.cpu()
    stats_cpu = collect_state_statistics(cpu.model, cpu.family, tokens, progress=False)
    stats_gpu = collect_state_statistics(gpu.model, gpu.family, tokens, progress=False)
    rank_cpu, rank_gpu = stats_cpu.mean["threshold_rank"], stats_gpu.mean["threshold_rank"]
    norm_cpu, norm_gpu = stats_cpu.mean["nuclear_norm"], stats_gpu.mean["nuclear_norm"]
    return {
        "logits_max_abs_diff_fp32": (logits_cpu - logits_gpu).abs().max().item(),
        "logits_max_abs": logits_cpu.abs().max().item(),
        "mean_threshold_rank_max_abs_diff": (rank_cpu - rank_gpu).abs().max().item(),
        "mean_threshold_rank_equal_share": (rank_cpu == rank_gpu).float().mean().item(),
        "nuclear_norm_max_rel_diff": ((norm_cpu - norm_gpu).abs() / norm_cpu.abs().clamp_min(1e-6)).max().item(),
        "head_order_identical": bool(
            torch.equal(rank_cpu.mean(0).argsort(dim=-1, stable=True), rank_gpu.mean(0).argsort(dim=-1, stable=True))
        ),
    }


def exactness_on_cuda(use_fla: bool) -> dict:
    """Removing heads equals masking them on CUDA (float32), every tiny family, uneven groups; with fla's kernels,
    or with the PyTorch recurrence on CUDA tensors (to tell kernel numerics from slicing)."""
    from compressor.modeling import gated_delta
    from tiny_models import CONFIGS, PLANS, masked_copy, tiny_model

    gated_delta.HAS_FLA = use_fla
    results = {}
    for name in CONFIGS:
        model = tiny_model(name).cuda()
        ids = torch.randint(3, 96, (2, 150), device="cuda")
        kept = PLANS["uneven"]
        with torch.no_grad():
            masked = masked_copy(model, kept)(ids).logits
            slim(model, family_for(model.config), PruningPlan(kept=kept))
            results[name] = (model(ids).logits - masked).abs().max().item()
    gated_delta.HAS_FLA = True
    return results


def rules_on_fixture(calib_samples: int, calib_len: int, eval_samples: int | None) -> dict:
    """Held-out perplexity after removing heads by every rule at the paper's budget (bf16, like shared/README)."""
    loaded = load_model(str(FIXTURE), device="cuda", dtype="bfloat16")
    tokens = token_windows(loaded.tokenizer, read_text(None)[0], calib_samples, calib_len, seed=0)
    eval_tokens = token_windows(loaded.tokenizer, EVAL.read_text(), eval_samples, 1024, seed=0)
    stats = collect_state_statistics(loaded.model, loaded.family, tokens, progress=False)
    head_bytes = {i: 32 * 32 * 2 for i in stats.layers}
    results = {"none": perplexity(loaded.model, eval_tokens, progress=False)}
    rules = [("joint", "high"), ("joint", "low"), ("rank", "high"), ("rank", "low"), ("norm", "high"),
             ("norm", "low")] + [("random", f"seed{s}") for s in range(5)]
    for method, end in rules:
        seed = int(end[4:]) if method == "random" else 0
        scores = score_heads(stats, method, 0.5, seed)
        plan = plan_by_budget(scores, head_bytes, 0.389, "high" if method == "random" else end)
        model = copy.deepcopy(loaded.model)
        slim(model, loaded.family, plan)
        results[f"{method}-{end}"] = perplexity(model, eval_tokens, progress=False)
    results["removed_heads"] = sum(8 - len(k) for k in plan.kept.values())
    return results


def capture_cost(small: bool) -> dict:
    """Plain forward against forward + state capture (threshold ranks on the GPU) on a 1B-class Qwen3-Next."""
    from transformers import AutoModelForCausalLM, Qwen3NextConfig

    layers = 4 if small else 24
    config = Qwen3NextConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
        layer_types=["linear_attention" if (i + 1) % 4 else "full_attention" for i in range(layers)],
        num_attention_heads=16, num_key_value_heads=2, head_dim=128, linear_num_key_heads=16,
        linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128, num_experts=0,
        mlp_only_layers=list(range(layers)), max_position_embeddings=4096,
    )
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    family = family_for(config)
    ids = torch.randint(0, 32000, (4, 2048), device="cuda")
    with torch.no_grad():
        plain = timed(lambda: model.model(input_ids=ids, use_cache=False), repeat=5)
    start = time.perf_counter()  # one run: the spectra of 4 × 32 × 18 × 16 states take minutes with svdvals
    collect_state_statistics(model, family, ids, batch_size=4, progress=False)
    torch.cuda.synchronize()
    capture = time.perf_counter() - start
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch": [4, 2048],
        "plain_forward_s": plain,
        "forward_with_capture_every_64_s": capture,
        "capture_overhead_ratio": capture / plain,
        "linear_layers": len(linear_layers(model, family)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--small", action="store_true", help="tiny settings, to check the script runs")
    parser.add_argument("--with-fla-exactness", action="store_true", help="also pruned-vs-masked through fla")
    args = parser.parse_args()
    small = args.small
    results = {"device": torch.cuda.get_device_name(), "versions": versions()}
    steps = [
        ("rules_on_fixture_ppl", lambda: rules_on_fixture(2 if small else 8, 512 if small else 1024,
                                                          4 if small else None)),
        ("gpu_vs_cpu", lambda: gpu_versus_cpu(2 if small else 8, 512 if small else 1024)),
        ("exactness_cuda_fp32_torch_path", lambda: exactness_on_cuda(use_fla=False)),
        ("capture_cost", lambda: capture_cost(small)),
    ]
    if "--with-fla-exactness" in sys.argv:  # Triton compiles for every tiny shape: minutes
        steps.append(("exactness_cuda_fp32_fla", lambda: exactness_on_cuda(use_fla=True)))
    for name, step in steps:
        start = time.perf_counter()
        try:
            results[name] = step()
        except Exception as error:  # keep the other figures when one step fails
            results[name] = {"error": f"{type(error).__name__}: {error}"}
        results[name + "_wall_s"] = time.perf_counter() - start
        print(name, json.dumps(results[name]), flush=True)
        args.out.write_text(json.dumps(results, indent=2))
    start = time.perf_counter()
    settings = PruneSettings(method="joint", remove="high", evaluation=EvalSettings(EVAL), device="cuda",
                             overwrite=True)
    record = prune(str(FIXTURE), args.out.parent / "pruned", settings, progress=False).record.to_dict()
    results["prune_cli_equivalent"] = {"wall_s": time.perf_counter() - start, "eval": record.get("eval"),
                                       "verify": record.get("verify")}
    print(json.dumps(results["prune_cli_equivalent"]))
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
