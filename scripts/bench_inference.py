"""Inference cost of pruned folders against their source, on a GPU: prefill, decode, peak memory, cold start.

    python scripts/bench_inference.py SOURCE_DIR PRUNED_DIR [MORE_DIRS...] --out results.json
    python scripts/bench_inference.py --build WORK --out results.json [--small]

``--build`` makes a random Qwen3-Next-shaped bf16 model (24 layers, 18 Gated DeltaNet layers of 16 key x 32 value
heads of 128, dense MLPs, vocabulary 151,936: about 2.2B parameters; ``--small`` makes a small one to try the
script) in WORK/source, prunes it with ``compress prune --state-reduction 0.389 --method joint --remove low`` twice
(first with an empty Triton cache, then warm: both wall times are reported) and once with ``--layout stock``, then
measures the three folders. Steps already done in WORK (recorded in WORK/results.json) are skipped, so a run cut
short goes on where it stopped.

Every folder is measured in a fresh process with an empty Triton cache of its own (``TRITON_CACHE_DIR``): the first
prefill and the first ``generate`` (compilation included), the number of Triton compilations each triggered, then,
warm, prefill of 1 x 8192 and 4 x 2048 tokens and eager greedy decoding of 128 new tokens after a 512-token prompt
at batch 1, 16, 64 and 256 (decode rate: the 127 tokens after the first, from generate(128) - generate(1)), with
the peak memory each adds. Figures are printed as measured and written to ``--out`` with the versions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "fixtures" / "qwen35-tiny-6m"
PRUNE = ["--state-reduction", "0.389", "--method", "joint", "--remove", "low"]
PREFILL_SHAPES = [(1, 8192), (4, 2048)]
DECODE_BATCHES = [1, 16, 64, 256]
PROMPT, NEW_TOKENS = 512, 128


def log(*parts) -> None:
    print(*parts, flush=True)


def compilations(cache: Path) -> int:
    """Kernels Triton compiled into ``cache`` (one metadata file per compiled kernel and configuration)."""
    return sum(1 for p in cache.rglob("*.json") if not p.name.startswith("__grp__"))


def source_config(small: bool):
    from transformers import Qwen3NextConfig

    width = 256 if small else 2048
    return Qwen3NextConfig(
        vocab_size=151936, hidden_size=width, intermediate_size=4 * width if small else 5632,
        num_hidden_layers=8 if small else 24, num_attention_heads=8 if small else 16, num_key_value_heads=2,
        head_dim=64 if small else 256, linear_num_key_heads=4 if small else 16,
        linear_num_value_heads=8 if small else 32, linear_key_head_dim=64 if small else 128,
        linear_value_head_dim=64 if small else 128, mlp_only_layers=list(range(8 if small else 24)),
        max_position_embeddings=16384, tie_word_embeddings=False, torch_dtype="bfloat16",
    )


def build(work: Path, small: bool, stock: bool, results: dict, save) -> None:
    """A random bf16 source model in work/source (tokenizer: the fixture's), and its pruned folders."""
    import torch
    from transformers import AutoTokenizer, Qwen3NextForCausalLM

    source = work / "source"
    if not (source / "config.json").exists():
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = Qwen3NextForCausalLM(source_config(small)).to(torch.bfloat16)
        model.save_pretrained(source)
        AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(source)
        results["source_parameters"] = sum(p.numel() for p in model.parameters())
        del model
        torch.cuda.empty_cache()
        save()
        log(f"built {source}: {results['source_parameters'] / 1e9:.3f}B parameters")
    cache = work / "triton-prune"
    seconds = results.setdefault("prune_seconds", {})
    for name, out, extra in (("cold", "pruned", []), ("warm", "pruned-warm", []),
                             ("stock", "pruned-stock", ["--layout", "stock"])):
        if (work / out / "config.json").exists() or (name == "warm" and name in seconds) or (extra and not stock):
            continue
        command = [sys.executable, "-c", "from compressor.cli import run; run()", "prune", str(source),
                   "--out", str(work / out), "--overwrite", *PRUNE, *extra]
        start = time.perf_counter()
        subprocess.run(command, check=True, env={**os.environ, "TRITON_CACHE_DIR": str(cache)})
        if name not in seconds:
            seconds[name] = time.perf_counter() - start
            results.setdefault("prune_compilations_so_far", {})[name] = compilations(cache)
        save()
        log(f"compress prune ({name}): {time.perf_counter() - start:.1f} s, {compilations(cache)} compilations so far")


def timed(fn, repeat: int = 3) -> float:
    """Median seconds of ``fn`` (CUDA-synchronised), after one untimed call."""
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure_one(folder: Path, cache: Path) -> dict:
    """Every figure for one folder, in this process (whose Triton cache is ``cache``, empty at start)."""
    import torch
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda",
                                                 trust_remote_code=True).eval()
    result = {"class": type(model).__name__, "load_seconds": time.perf_counter() - start,
              "parameters": sum(p.numel() for p in model.parameters())}
    vocab = model.config.vocab_size
    generator = torch.Generator(device="cuda").manual_seed(0)

    def tokens(batch: int, length: int) -> torch.Tensor:
        return torch.randint(0, min(vocab, 8192), (batch, length), device="cuda", generator=generator)

    def prefill(ids):
        with torch.no_grad():
            model(ids, logits_to_keep=1)

    def generate(ids, new):
        with torch.no_grad():
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    first = tokens(4, 2048)
    start = time.perf_counter()
    prefill(first)
    torch.cuda.synchronize()
    result["cold_first_prefill_4x2048_s"] = time.perf_counter() - start
    result["compilations_after_first_prefill"] = compilations(cache)
    start = time.perf_counter()
    generate(tokens(1, PROMPT), NEW_TOKENS)
    torch.cuda.synchronize()
    result["cold_first_generate_b1_s"] = time.perf_counter() - start
    result["compilations_after_first_generate"] = compilations(cache)
    log(json.dumps(result))

    for batch, length in PREFILL_SHAPES:
        ids = tokens(batch, length)
        result[f"prefill_{batch}x{length}_s"] = timed(lambda: prefill(ids))
        log(f"  prefill {batch}x{length}: {result[f'prefill_{batch}x{length}_s'] * 1e3:.1f} ms")
    for batch in DECODE_BATCHES:
        ids = tokens(batch, PROMPT)
        generate(ids, 8)
        one = timed(lambda: generate(ids, 1), repeat=1)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        full = timed(lambda: generate(ids, NEW_TOKENS), repeat=1)
        result[f"decode_b{batch}_tok_s"] = batch * (NEW_TOKENS - 1) / (full - one)
        result[f"decode_b{batch}_extra_peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        log(f"  decode batch {batch}: {result[f'decode_b{batch}_tok_s']:.1f} tok/s, "
            f"extra peak {result[f'decode_b{batch}_extra_peak_gib']:.2f} GiB")
    result["compilations_total"] = compilations(cache)
    for batch in (1, 64):
        result[f"profile_decode_b{batch}"] = profile(lambda: generate(tokens(batch, PROMPT), 16))
    return result


def profile(fn, top: int = 12) -> dict:
    """Where the time of ``fn`` goes: the operators with the most GPU time and the most CPU time (ms, calls)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
    events = prof.key_averages()
    rows = lambda key: [(e.key[:80], round(getattr(e, key) / 1e3, 2), e.count)  # noqa: E731
                        for e in sorted(events, key=lambda e: -getattr(e, key))[:top]]
    return {"gpu": rows("self_device_time_total"), "cpu": rows("self_cpu_time_total"),
            "gpu_total_ms": sum(e.self_device_time_total for e in events) / 1e3,
            "cpu_total_ms": sum(e.self_cpu_time_total for e in events) / 1e3}


def measure(folder: Path) -> dict:
    """``measure_one`` in a fresh process with an empty Triton cache."""
    with tempfile.TemporaryDirectory(prefix="triton-") as cache:
        env = {**os.environ, "TRITON_CACHE_DIR": cache}
        report = Path(cache) / "report.json"
        subprocess.run([sys.executable, __file__, "--one", str(folder), "--out", str(report)], check=True, env=env)
        return json.loads(report.read_text())


def versions() -> dict:
    import torch

    from compressor.accounting import versions as package_versions

    return {"gpu": torch.cuda.get_device_name(), "python": sys.version.split()[0], **package_versions()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", type=Path)
    parser.add_argument("--build", type=Path, help="build and prune a random 2.2B model in this folder")
    parser.add_argument("--small", action="store_true", help="with --build: a small model, to try the script")
    parser.add_argument("--no-stock", action="store_true", help="with --build: no stock-layout folder")
    parser.add_argument("--resume", type=Path, help="with --build: figures of an earlier run (not measured again)")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.one:
        args.out.write_text(json.dumps(measure_one(args.one, Path(os.environ["TRITON_CACHE_DIR"]))))
        return
    record = args.build / "results.json" if args.build else args.out
    earlier = args.resume or record
    results = json.loads(earlier.read_text()) if args.build and earlier.exists() else {}
    results["versions"] = versions()

    def save():
        record.write_text(json.dumps(results, indent=2))
        if record != args.out:
            args.out.write_text(record.read_text())

    folders = args.folders
    if args.build:
        args.build.mkdir(parents=True, exist_ok=True)
        build(args.build, args.small, not args.no_stock, results, save)
        folders = [args.build / name for name in ("source", "pruned", "pruned-stock")[: 2 if args.no_stock else 3]]
    for folder in folders:
        if folder.name not in results:
            log(f"measuring {folder}")
            results[folder.name] = measure(folder)
            save()
    names = [f.name for f in folders]
    for name in names[1:]:
        ratios = {key: results[name][key] / results[names[0]][key] for key in results[name]
                  if key.endswith(("_s", "_gib")) and results[names[0]].get(key)}
        results[f"{name}_over_{names[0]}"] = ratios
        log(f"{name} / {names[0]}: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    save()


if __name__ == "__main__":
    main()
