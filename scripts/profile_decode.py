"""Where a decode step of Gated DeltaNet models spends its time, on a GPU: the stock transformers code against the
shipped forward, layer by layer and piece by piece, then whole models.

    python scripts/profile_decode.py --out results.json [--phases layer,model,kernels] [--batches 1,64] [--calls 300]

Phase ``layer``: one bf16 Qwen3-Next layer of the benchmark's shape (hidden 2048, 16 key x 32 value heads of 128) with random
weights, its cache primed by a 16-token prefill. Each variant runs ``--calls`` single-token steps back to back and
reports the wall time per call (at small batch the GPU waits on Python, so this is the host's cost) and the GPU
kernel time per call (CUDA events around the loop, so it is the larger of the two at large batch). Variants run in
turns, the order reversed every round, medians of ``--rounds``. Then the operators with the most host time in one
step of each forward (torch.profiler).

Phase ``model``: the benchmark's 2.2B model (random bf16 weights, built on the GPU) decoding with ``generate``: the
stock class, the same weights with every Gated DeltaNet layer under the shipped forward, and a model with about 39 %
of its value heads removed unevenly (``per_layer_config``, the shipped class), with fla's fused norm and without.
Decode step wall time = (generate(1 + S) - generate(1)) / S, in turns, medians; then the Python functions with the
most own time in S steps of the stock and the shipped forward (cProfile).

Phase ``kernels``: the stock 2.2B model and the pruned one, each decoding with its cache by direct forward calls
(no ``generate``) after a 64-token prefill: wall and GPU time per step (CUDA events), in turns, medians; then the
GPU kernels of 10 steps of each (torch.profiler), device time per step grouped by kernel name, so that the GPU time
of the two models can be compared kernel by kernel. Figures are printed as measured and written to ``--out`` with
the versions.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F


@contextmanager
def stock_gated_norm():
    """The shipped mixers' gated norm through the stock module's forward: fla's kernel hidden from them."""
    from compressor.modeling import gated_deltanet

    found = gated_deltanet.gated_norm_kernel
    gated_deltanet.gated_norm_kernel = lambda: None
    try:
        yield
    finally:
        gated_deltanet.gated_norm_kernel = found


def layer_config():
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(
        hidden_size=2048, num_hidden_layers=1, layer_types=["linear_attention"], linear_num_key_heads=16,
        linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128, vocab_size=1024,
    )


def per_call(step, calls: int) -> tuple[float, float]:
    """(wall ms, GPU ms) per call of ``step()`` over ``calls`` calls, after 20 untimed ones."""
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start = time.perf_counter()
    begin.record()
    for _ in range(calls):
        step()
    end.record()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / calls, begin.elapsed_time(end) / calls


def variants(batch: int) -> dict:
    """name -> a function running one decode step (or one piece of it) at ``batch``."""
    from transformers import DynamicCache
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    from compressor.modeling import gated_delta, gated_deltanet, packed_heads
    from compressor.modeling.modeling_qwen3_next import PrunedQwen3NextGatedDeltaNet

    config = layer_config()
    torch.manual_seed(0)
    stock = Qwen3NextGatedDeltaNet(config, 0).cuda().bfloat16().eval()
    shipped = Qwen3NextGatedDeltaNet(config, 0).cuda().bfloat16().eval()
    shipped.load_state_dict(stock.state_dict())
    PrunedQwen3NextGatedDeltaNet.adopt(shipped)
    hidden = torch.randn(batch, 1, config.hidden_size, device="cuda", dtype=torch.bfloat16)

    def primed(module):
        cache = DynamicCache(config=config)
        module(torch.randn(batch, 16, config.hidden_size, device="cuda", dtype=torch.bfloat16), cache=cache)
        return cache

    caches = {"stock": primed(stock), "shipped": primed(shipped)}
    heads, k_dim, v_dim = config.linear_num_value_heads, config.linear_key_head_dim, config.linear_value_head_dim
    rows = torch.randn(batch * heads, v_dim, device="cuda", dtype=torch.bfloat16)
    gate = torch.randn_like(rows)
    q = torch.randn(batch, 1, heads, k_dim, device="cuda", dtype=torch.bfloat16)
    q_grouped = torch.randn(batch, 1, config.linear_num_key_heads, k_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(batch, 1, heads, v_dim, device="cuda", dtype=torch.bfloat16)
    g = -torch.rand(batch, 1, heads, device="cuda")
    beta = torch.rand(batch, 1, heads, device="cuda", dtype=torch.bfloat16)
    state = torch.zeros(batch, heads, k_dim, v_dim, device="cuda")
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

    def no_fused_norm():
        with stock_gated_norm():
            shipped(hidden, cache=caches["shipped"])

    qkvz = stock.in_proj_qkvz(hidden)
    ba = stock.in_proj_ba(hidden)
    raw_gate = ba[..., :heads].contiguous()
    return {
        "stock forward": lambda: stock(hidden, cache=caches["stock"]),
        "shipped forward": lambda: shipped(hidden, cache=caches["shipped"]),
        "shipped forward, stock norm": no_fused_norm,
        "norm: stock module": lambda: stock.norm(rows, gate),
        "norm: fla fused": lambda: gated_deltanet.gated_rms_norm(shipped.norm, rows, gate),
        "recurrence: fla, grouped heads (stock)": lambda: fused_recurrent_gated_delta_rule(
            q_grouped, q_grouped, v, g, beta, initial_state=state, output_final_state=True,
            use_qk_l2norm_in_kernel=True),
        "recurrence: fla, one head per value head": lambda: fused_recurrent_gated_delta_rule(
            q, q, v, g, beta, initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True),
        "recurrence: fla, one head per value head, gates and sigmoid in the kernel": lambda:
            fused_recurrent_gated_delta_rule(q, q, v, raw_gate, beta, initial_state=state, output_final_state=True,
                                             use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                                             A_log=stock.A_log, dt_bias=stock.dt_bias, use_beta_sigmoid_in_kernel=True),
        "recurrence: shipped": lambda: gated_delta.gated_delta_rule(
            q, q, v, g, beta, initial_state=state, output_final_state=True),
        "recurrence: heads as sequences (varlen)": lambda: packed_heads.heads_as_sequences(
            fused_recurrent_gated_delta_rule, dict(q=q, k=q, v=v, g=g, beta=beta), initial_state=state,
            output_final_state=True, use_qk_l2norm_in_kernel=True),
        "projections: stock ordering": lambda: stock.fix_query_key_value_ordering(
            stock.in_proj_qkvz(hidden), stock.in_proj_ba(hidden)),
        "projections: shipped": lambda: shipped.project(hidden),
        "queries and keys: shipped gather": lambda: shipped.queries_and_keys(
            qkvz[..., : 2 * shipped.key_dim]),
        "gates": lambda: -stock.A_log.float().exp() * F.softplus(ba[..., :heads].float() + stock.dt_bias),
    }, (stock, shipped, hidden, caches)


def host_ops(module, hidden, cache, top: int = 25) -> list:
    """The operators with the most host (CPU) time over 20 steps: (name, self CPU µs per step, calls per step)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            module(hidden, cache=cache)
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return [(e.key[:70], round(e.self_cpu_time_total / 20, 1), e.count / 20) for e in events]


def layer_phase(batch: int, calls: int, rounds: int) -> dict:
    """Wall and GPU time per call of every variant at ``batch``, and the host operators of both forwards."""
    steps, (stock, shipped, hidden, caches) = variants(batch)
    names = list(steps)
    values = {name: [] for name in names}
    for turn in range(rounds):
        for name in names if turn % 2 == 0 else names[::-1]:
            values[name].append(per_call(steps[name], calls))
    figures = {}
    for name in names:
        walls, gpus = sorted(w for w, _ in values[name]), sorted(g for _, g in values[name])
        figures[name] = {"wall_ms": round(walls[len(walls) // 2], 4), "gpu_ms": round(gpus[len(gpus) // 2], 4)}
        print(f"batch {batch}: {name}: wall {figures[name]['wall_ms']:.4f} ms, "
              f"GPU {figures[name]['gpu_ms']:.4f} ms per call", flush=True)
    for which in ("stock", "shipped"):
        module = stock if which == "stock" else shipped
        figures[f"host ops: {which}"] = host_ops(module, hidden, caches[which])
        print(f"batch {batch}, host ops per step, {which}:", flush=True)
        for row in figures[f"host ops: {which}"]:
            print("   ", row, flush=True)
    return figures


def pruned_config(config, seed: int = 0):
    """``config`` with about 39 % of each Gated DeltaNet layer's value heads removed, unevenly across key heads (key
    heads left without value heads removed), in ``per_layer_config``."""
    import copy

    rng = random.Random(seed)
    new = copy.deepcopy(config)
    new.linear_value_to_key_head = None
    ratio = config.linear_num_value_heads // config.linear_num_key_heads
    overrides = {}
    for index, kind in enumerate(config.layer_types):
        if kind != "linear_attention":
            continue
        kept = sorted(rng.sample(range(config.linear_num_value_heads), round(0.61 * config.linear_num_value_heads)))
        groups = sorted({head // ratio for head in kept})
        value_to_key = [groups.index(head // ratio) for head in kept]
        overrides[str(index)] = {"linear_num_key_heads": len(groups), "linear_num_value_heads": len(kept),
                                 "linear_value_to_key_head": value_to_key}
    new.per_layer_config = overrides
    return new


def decode_step_ms(model, batch: int, steps: int) -> float:
    """Wall ms of one decode step: (generate(1 + steps) - generate(1)) / steps after a 64-token prompt."""
    ids = torch.randint(0, 8192, (batch, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def generate(new: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    return (generate(1 + steps) - generate(1)) * 1e3 / steps


def python_profile(run, top: int = 20) -> list:
    """The Python functions with the most own time in ``run()``: (function, own ms, calls)."""
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:top]
    return [(f"{Path(file).name}:{line}({name})", round(own * 1e3, 2), calls)
            for (file, line, name), (_, calls, own, _, _) in rows]


def model_phase(batches: list[int], rounds: int, steps: int, results: dict, save) -> None:
    """Decode step wall times of the stock class, the shipped forward on the same weights, and a pruned model."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_inference import source_config
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    from compressor.modeling.modeling_qwen3_next import PrunedQwen3NextGatedDeltaNet

    start = time.perf_counter()
    stock, pruned = build_models(source_config(small=False))
    print(f"model: built both models in {time.perf_counter() - start:.0f} s", flush=True)
    mixers = [layer.linear_attn for layer in stock.model.layers if hasattr(layer, "linear_attn")]
    for mixer in mixers:
        PrunedQwen3NextGatedDeltaNet.adopt(mixer)

    def run(model, shipped: bool, fused_norm: bool):
        def step(batch: int) -> float:
            for mixer in mixers:
                mixer.__class__ = PrunedQwen3NextGatedDeltaNet if shipped else Qwen3NextGatedDeltaNet
            if fused_norm:
                return decode_step_ms(model, batch, steps)
            with stock_gated_norm():
                return decode_step_ms(model, batch, steps)
        return step

    variants = {"stock class": run(stock, False, True), "stock weights, shipped forward": run(stock, True, True),
                "stock weights, shipped forward, stock norm": run(stock, True, False),
                "pruned (39 % of value heads, uneven)": run(pruned, True, True),
                "pruned, stock norm": run(pruned, True, False)}
    figures = results.setdefault("model", {})
    for batch in batches:
        start = time.perf_counter()
        for step in variants.values():  # compile and autotune
            step(batch)
        print(f"model, batch {batch}: warm-up {time.perf_counter() - start:.0f} s", flush=True)
        values = {name: [] for name in variants}
        for turn in range(rounds):
            for name in list(variants) if turn % 2 == 0 else list(variants)[::-1]:
                values[name].append(variants[name](batch))
        for name, times in values.items():
            figures[f"{name}, batch {batch}, decode step ms"] = median = sorted(times)[len(times) // 2]
            print(f"model, batch {batch}: {name}: {median:.3f} ms per decode step ({', '.join(f'{t:.2f}' for t in times)})",
                  flush=True)
        save()
    for name in ("stock class", "stock weights, shipped forward"):
        rows = python_profile(lambda: variants[name](1))
        figures[f"python own time, {name}, batch 1"] = rows
        print(f"model, batch 1, Python functions with the most own time over {steps + 1 + 1} generate tokens, {name}:",
              flush=True)
        for row in rows:
            print("   ", row, flush=True)
        save()


def build_models(config):
    """The stock 2.2B model and the pruned one (``pruned_config``), random bf16 weights, built on the GPU."""
    from transformers import Qwen3NextForCausalLM

    from compressor.modeling.modeling_qwen3_next import PrunedQwen3NextForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        stock = Qwen3NextForCausalLM(config).to(torch.bfloat16).eval()
        pruned = PrunedQwen3NextForCausalLM(pruned_config(config)).to(torch.bfloat16).eval()
    return stock, pruned


def cached_decoder(model, batch: int):
    """A function running one cached decode step of ``model`` at ``batch`` (a 64-token prefill first)."""
    from transformers import DynamicCache

    ids = torch.randint(0, 8192, (batch, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    cache = DynamicCache(config=model.config)
    token = model(ids, past_key_values=cache, logits_to_keep=1).logits.argmax(-1)

    def step():
        nonlocal token
        token = model(token, past_key_values=cache, logits_to_keep=1).logits.argmax(-1)
    return step


def gpu_kernels(step, steps: int = 10, top: int = 30) -> tuple[float, list]:
    """(GPU kernel ms per step, [(kernel, µs per step, launches per step)] for the ``top`` kernels) over ``steps``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events) / steps / 1e3
    events.sort(key=lambda e: -e.self_device_time_total)
    return total, [(e.key[:90], round(e.self_device_time_total / steps, 1), e.count / steps) for e in events[:top]]


def kernels_phase(batches: list[int], rounds: int, calls: int, results: dict, save) -> None:
    """Wall and GPU ms per cached decode step of the stock and the pruned model, then their kernels."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_inference import source_config

    start = time.perf_counter()
    models = dict(zip(("stock class", "pruned (39 % of value heads, uneven)"), build_models(source_config(small=False))))
    print(f"kernels: built both models in {time.perf_counter() - start:.0f} s", flush=True)
    figures = results.setdefault("kernels", {})
    for batch in batches:
        steps = {name: cached_decoder(model, batch) for name, model in models.items()}
        values = {name: [] for name in steps}
        for turn in range(rounds):
            for name in list(steps) if turn % 2 == 0 else list(steps)[::-1]:
                values[name].append(per_call(steps[name], calls))
        for name, pairs in values.items():
            walls, gpus = sorted(w for w, _ in pairs), sorted(g for _, g in pairs)
            wall, gpu = walls[len(walls) // 2], gpus[len(gpus) // 2]
            total, rows = gpu_kernels(steps[name])
            figures[f"batch {batch}, {name}"] = {"wall_ms": round(wall, 3), "gpu_ms": round(gpu, 3),
                                                  "kernel_ms": round(total, 3), "kernels": rows}
            print(f"kernels, batch {batch}: {name}: wall {wall:.3f} ms, GPU {gpu:.3f} ms per step; kernels "
                  f"{total:.3f} ms in {sum(r[2] for r in rows):.0f}+ launches; top:", flush=True)
            for row in rows[:15]:
                print("   ", row, flush=True)
        del steps
        torch.cuda.empty_cache()
        save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--phases", default="layer,model")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--steps", type=int, default=32, help="decode steps per model measurement")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists: choose another --out")
    import fla
    import transformers
    import triton

    results = {"versions": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "triton": triton.__version__,
                            "fla": fla.__version__}}
    print(json.dumps(results["versions"]), flush=True)
    batches = [int(b) for b in args.batches.split(",")]

    def save():
        args.out.write_text(json.dumps(results, indent=1))

    phases = args.phases.split(",")
    if "layer" in phases:
        with torch.inference_mode():
            for batch in batches:
                results[f"batch {batch}"] = layer_phase(batch, args.calls, args.rounds)
                save()
    if "model" in phases:
        with torch.no_grad():
            model_phase(batches, args.rounds, args.steps, results, save)
    if "kernels" in phases:
        with torch.inference_mode():
            kernels_phase(batches, args.rounds, args.steps, results, save)


if __name__ == "__main__":
    main()
