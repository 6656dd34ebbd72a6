"""Check, on a CUDA GPU, that compressor's fla families give fla's results: CUDA tensors go through fla's Triton
kernels, CPU tensors through compressor's PyTorch references, and both must agree within float tolerance.

For each fla family (gated_deltanet with grouped value heads, delta_net, gla, kda with grouped value heads) a random
model of a few million parameters, pruned with an uneven plan (so grouped layers carry an explicit value->key
map), is run on 2 × 485 tokens (7 full 64-token chunks and a partial one):

* logits: GPU (fla kernels) in float32 and bfloat16 vs the CPU float32 PyTorch path;
* final recurrent states: those fla's kernels leave in the cache vs the CPU recurrence's;
* chunk states (calibration, strict float32: fla's kernels in IEEE mode for Gated DeltaNet, the PyTorch
  recurrence otherwise) on the GPU vs on the CPU;
* cached decoding: 4 greedy steps on the GPU (fla's recurrent kernels, convolution steps) vs an uncached CPU pass;
* exactness on the GPU: the pruned model vs the unpruned one with the removed heads masked, both through fla.

Prints one JSON object (and writes it to $OUT/check_fla_families_gpu.json when OUT is set). Families are run in
order and the run stops early, saying so, when ``--budget-s`` is spent (Triton compiles every kernel on first use).

    python scripts/check_fla_families_gpu.py [--budget-s 240]
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path

import torch

import compressor
from compressor.calibration import states_handed_to
from compressor.families import family_for
from compressor.layers import PruningPlan, linear_layers
from compressor.slicing import slim

compressor.register()  # the shipped classes, which route CPU tensors away from fla

COMMON = dict(hidden_size=512, num_hidden_layers=4, vocab_size=2048, hidden_ratio=2, fuse_cross_entropy=False)
CONFIGS = {
    "gated_deltanet": dict(num_heads=4, num_v_heads=8, head_dim=64, expand_v=2.0),
    "delta_net": dict(num_heads=8, expand_k=1.0, expand_v=1.0, use_gate=True),
    "gla": dict(num_heads=4, expand_k=0.5, expand_v=1.0),
    "kda": dict(num_heads=4, num_v_heads=8, head_dim=64, expand_v=1.0),
}
BATCH, LENGTH, DECODE_STEPS = 2, 485, 4


def versions() -> dict:
    found = {}
    for package in ("torch", "transformers", "triton", "flash-linear-attention", "fla-core"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    found["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return found


def random_model(model_type: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **COMMON, **CONFIGS[model_type])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.05)
    return model


def uneven_plan(model: torch.nn.Module) -> dict[int, list[int]]:
    """Drop value heads 1 and 2 of every even layer (uneven groups where value heads are grouped), head 0 of odd
    layers."""
    mixers = linear_layers(model, family_for(model.config))
    dropped = {i: (1, 2) if i % 2 == 0 else (0,) for i in mixers}
    return {i: [h for h in range(m.num_v_heads) if h not in dropped[i]] for i, m in mixers.items()}


def masked(model: torch.nn.Module, kept: dict[int, list[int]]) -> torch.nn.Module:
    masked_model = copy.deepcopy(model)
    for index, mixer in linear_layers(masked_model, family_for(model.config)).items():
        with torch.no_grad():
            for head in set(range(mixer.num_v_heads)) - set(kept[index]):
                mixer.o_proj.weight[:, head * mixer.head_v_dim : (head + 1) * mixer.head_v_dim] = 0
    return masked_model


@torch.no_grad()
def run(model: torch.nn.Module, ids: torch.Tensor, states: bool = True) -> dict:
    """Logits [B, T, V] float32, final recurrent states per layer, chunk states per layer (unless not ``states``),
    and greedy cached decode logits [steps, B, V], all on the CPU."""
    device = next(model.parameters()).device
    family = family_for(model.config)
    chunk_states = {}

    def sink(layer, states):
        chunk_states[layer] = states.cpu()

    mixers = linear_layers(model, family)
    if states:
        with states_handed_to(sink, mixers):
            model.model(input_ids=ids.to(device), use_cache=False)
    progress(f"  {device}: chunk states done")
    output = model(input_ids=ids.to(device), use_cache=True)
    progress(f"  {device}: cached forward done")
    finals = {i: output.past_key_values[i]["recurrent_state"].float().cpu() for i in mixers}
    generated = model.generate(ids.to(device), max_new_tokens=DECODE_STEPS, do_sample=False, output_logits=True,
                               return_dict_in_generate=True, pad_token_id=0)
    progress(f"  {device}: decoding done")
    return {"logits": output.logits.float().cpu(), "finals": finals, "chunk_states": chunk_states,
            "sequences": generated.sequences.cpu(), "decode": torch.stack(generated.logits).float().cpu()}


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def check_family(model_type: str, gpu_states: bool = True, dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> dict:
    model = random_model(model_type)
    kept = uneven_plan(model)
    reference_unpruned = masked(model, kept)
    slim(model, family_for(model.config), PruningPlan(kept=kept))
    ids = torch.randint(3, COMMON["vocab_size"], (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
    progress(f"{model_type}: CPU reference")
    cpu = run(model, ids)
    uncached = model(cpu["sequences"]).logits.float()  # CPU, one pass over prompt + decoded tokens
    report = {"kept": {str(i): heads for i, heads in kept.items()},
              "logit_scale": cpu["logits"].abs().max().item(),
              "state_scale": max(s.abs().max().item() for s in cpu["finals"].values()),
              "cpu_decode_vs_uncached": max_diff(cpu["decode"], uncached[:, LENGTH - 1 : -1].transpose(0, 1))}
    for dtype in (getattr(torch, name) for name in dtypes):
        progress(f"{model_type}: GPU {dtype}")
        gpu_model = copy.deepcopy(model).to("cuda", dtype)
        gpu = run(gpu_model, ids, states=gpu_states)
        same_prefix = torch.equal(gpu["sequences"], cpu["sequences"])
        report[str(dtype).removeprefix("torch.")] = {
            "logits_max_abs_diff": max_diff(gpu["logits"], cpu["logits"]),
            "final_state_max_abs_diff": max(max_diff(gpu["finals"][i], cpu["finals"][i]) for i in cpu["finals"]),
            "chunk_states_max_abs_diff": max(
                max_diff(gpu["chunk_states"][i], cpu["chunk_states"][i]) for i in cpu["chunk_states"]
            ) if gpu_states else "not run (--no-gpu-states)",
            "greedy_tokens_equal": same_prefix,
            "decode_logits_max_abs_diff": max_diff(gpu["decode"], cpu["decode"]),
        }
        del gpu_model
    progress(f"{model_type}: GPU pruned vs masked")
    with torch.no_grad():
        gpu_pruned = copy.deepcopy(model).to("cuda")
        gpu_masked = reference_unpruned.to("cuda")
        report["gpu_pruned_vs_masked_fp32"] = max_diff(gpu_pruned(ids.cuda()).logits, gpu_masked(ids.cuda()).logits)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=240.0, help="stop starting new families after this long")
    parser.add_argument("--families", default=",".join(CONFIGS), help="comma-separated fla model types")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="GPU dtypes to compare with the CPU")
    parser.add_argument("--no-gpu-states", action="store_true",
                        help="skip the GPU calibration pass (its strict-float32 fla kernels compile for minutes)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this check needs a CUDA GPU")
    started = time.time()
    result = {"versions": versions(), "shape": {"batch": BATCH, "tokens": LENGTH, **COMMON}, "families": {}}
    out = Path(os.environ["OUT"]) / "check_fla_families_gpu.json" if os.environ.get("OUT") else None
    for model_type in args.families.split(","):
        if time.time() - started > args.budget_s:
            result["families"][model_type] = "skipped: time budget spent"
            continue
        began = time.time()
        try:
            result["families"][model_type] = check_family(
                model_type, gpu_states=not args.no_gpu_states, dtypes=tuple(args.dtypes.split(","))
            )
            result["families"][model_type]["seconds"] = round(time.time() - began, 1)
        except Exception as error:  # report and go on with the next family
            result["families"][model_type] = f"failed: {type(error).__name__}: {error}"[:2000]
        if out is not None:
            out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
