"""Inference cost of pruned folders against their source, on a GPU: prefill, decode, peak memory, cold start.

    python scripts/bench_inference.py SOURCE_DIR PRUNED_DIR [MORE_DIRS...] --out results.json
    python scripts/bench_inference.py --build WORK --out results.json [--small] [--synthetic-stats] [--phase P]

``--build`` makes a random Qwen3-Next-shaped bf16 model (24 layers, 18 Gated DeltaNet layers of 16 key x 32 value
heads of 128, dense MLPs, vocabulary 151,936: about 2.2B parameters; ``--small`` makes a small one to try the
script) in WORK/source, prunes it with ``compress prune --state-reduction 0.389 --method joint --remove low`` twice
(first with an empty Triton cache, then warm: both wall times are reported; ``--synthetic-stats``: once, from random
statistics, untimed) and once with ``--layout stock``, then measures the three folders. Steps already done in WORK
(recorded in WORK/results.json) are skipped, so a run cut short goes on where it stopped.

Phase ``build`` stops once the folders are written (the prunes' times recorded). Phase ``cold``: every folder in a
fresh process with an empty Triton cache of its own (WORK/triton-NAME): the first prefill and the first
``generate``, compilation included, and the number of Triton compilations each left behind.
Phase ``warm``: every folder loaded in one process and measured in turns, the order reversed every round (ratios
side by side, not across processes or machines): prefill of 1 x 8192 and 4 x 2048 tokens, eager greedy decoding of
128 new tokens after a 512-token prompt at batch 1, 16, 64 and 256 (decode rate: the 127 tokens after the first,
from generate(128) - generate(1); the median of the rounds, every round, and the best) with the peak memory each
adds, then the kernel launches, GPU time and wall time of one decode step. Each model's class is recorded; a folder
without ``auto_map`` (the source, a stock layout) must load with its stock class. The decode time ratio expected
from the bytes each step moves is written beside, and the decode graphs each shipped model recorded and replayed so
far; ``--eager-copy`` adds the last folder with shipped code a second time, its decode graphs off (NAME-eager).
Figures are printed as measured and written to ``--out`` with the versions and the launch configurations fla's
config-file kernels held (``fla_configs``: after each folder's first calls; ``fla_configs_warm``, by ``--points``:
after the warm phase): fla caches its autotuning choices in the Triton cache, so a process may run with an earlier
one's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import shutil
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


def build(work: Path, small: bool, stock: bool, synthetic: bool, results: dict, save) -> None:
    """A random bf16 source model in work/source (tokenizer: the fixture's), and its pruned folders: calibrated
    (``compress prune`` cold, then warm, both timed), or with ``synthetic`` from random statistics of the right
    shape (no calibration, no verification: the heads chosen are arbitrary, their counts per layer realistic)."""
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
    extra_options = []
    if synthetic:
        from transformers import AutoConfig

        from compressor.calibration import StateStatistics

        config = AutoConfig.from_pretrained(source)
        layers = [i for i, kind in enumerate(config.layer_types) if kind == "linear_attention"]
        shape = (config.linear_key_head_dim, config.linear_value_head_dim)
        StateStatistics.synthetic(layers, [config.linear_num_value_heads] * len(layers),
                                  [shape] * len(layers)).save(work / "stats")
        extra_options = ["--stats", str(work / "stats"), "--no-verify"]
    cache = work / "triton-prune"
    seconds = results.setdefault("prune_seconds", {})
    for name, out, extra in (("cold", "pruned", []), ("warm", "pruned-warm", []),
                             ("stock", "pruned-stock", ["--layout", "stock"])):
        if (work / out / "config.json").exists() or (name == "warm" and (name in seconds or synthetic)) or \
                (extra and not stock):
            continue
        command = [sys.executable, "-m", "compressor", "prune", str(source),
                   "--out", str(work / out), "--overwrite", *PRUNE, *extra_options, *extra]
        start = time.perf_counter()
        subprocess.run(command, check=True, env={**os.environ, "TRITON_CACHE_DIR": str(cache)})
        if name not in seconds and not synthetic:
            seconds[name] = time.perf_counter() - start
            results.setdefault("prune_compilations_so_far", {})[name] = compilations(cache)
        save()
        log(f"compress prune ({name}): {time.perf_counter() - start:.1f} s, {compilations(cache)} compilations so far")


def seconds_of(fn) -> float:
    """Seconds of one call of ``fn``, the GPU synchronised before and after it."""
    import torch

    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def timed(fn, repeat: int = 3) -> float:
    """Median seconds of ``fn`` (``seconds_of``), after one untimed call."""
    fn()
    times = sorted(seconds_of(fn) for _ in range(repeat))
    return times[len(times) // 2]


def in_turns(runners: dict, names: list[str], turns: int, measure) -> dict[str, list]:
    """name -> [measure(name, runners[name]) of every turn], the names measured one after another in each turn, in
    the reverse order every other turn."""
    values = {name: [] for name in names}
    for turn in range(turns):
        for name in names if turn % 2 == 0 else names[::-1]:
            values[name].append(measure(name, runners[name]))
    return values


class Runner:
    """One folder's model on the GPU (bf16), with the benchmark's workloads on random tokens."""

    def __init__(self, folder: Path, model=None):
        """``model``: already loaded (on the GPU, bf16) instead of loading ``folder``."""
        import torch
        from transformers import AutoModelForCausalLM

        start = time.perf_counter()
        self.model = model or AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda",
                                                                   use_kernels=False,
                                                                   trust_remote_code=True).eval()
        self.load_seconds = time.perf_counter() - start
        self.generator = torch.Generator(device="cuda").manual_seed(0)

    def tokens(self, batch: int, length: int):
        import torch

        vocab = min(self.model.config.vocab_size, 8192)
        return torch.randint(0, vocab, (batch, length), device="cuda", generator=self.generator)

    def prefill(self, ids) -> None:
        import torch

        with torch.no_grad():
            self.model(ids, logits_to_keep=1)

    def generate(self, ids, new: int) -> None:
        import torch

        with torch.no_grad():
            self.model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)


def measure_cold(folder: Path, cache: Path) -> dict:
    """First calls of one folder, in this process (whose Triton cache is ``cache``, empty at start): the first
    prefill of 4 x 2048 tokens and the first ``generate`` at batch 1, with the compilations each leaves behind."""
    import torch

    runner = Runner(folder)
    result = {"class": type(runner.model).__name__, "load_seconds": runner.load_seconds,
              "parameters": sum(p.numel() for p in runner.model.parameters())}
    first = runner.tokens(4, 2048)
    start = time.perf_counter()
    runner.prefill(first)
    torch.cuda.synchronize()
    result["cold_first_prefill_4x2048_s"] = time.perf_counter() - start
    result["compilations_after_first_prefill"] = compilations(cache)
    start = time.perf_counter()
    runner.generate(runner.tokens(1, PROMPT), NEW_TOKENS)
    torch.cuda.synchronize()
    result["cold_first_generate_b1_s"] = time.perf_counter() - start
    result["compilations_after_first_generate"] = compilations(cache)
    log(json.dumps(result))
    from compressor.tuned_kernels import autotuned_fla_configs

    result["fla_configs"] = autotuned_fla_configs()  # the choices the first calls made or read
    return result


POINTS = ("prefill", "steps", *(str(batch) for batch in DECODE_BATCHES))
"""What the warm phase measures by default: prefill times, one decode step's launches, decoding at each batch size
(``--points`` takes other batch sizes too)."""


def graph_counts(model) -> dict[str, int]:
    """Decode graphs the shipped mixers of ``model`` recorded and replayed so far (zero for stock classes)."""
    graphs = [module._decode_graph for module in model.modules() if hasattr(module, "_decode_graph")]
    return {"captures": sum(g.captures for g in graphs), "replays": sum(g.replays for g in graphs)}


def measure_side_by_side(folders: list[Path], rounds: int, results: dict, save, points: tuple[str, ...] = POINTS,
                         eager_copy: bool = False) -> None:
    """Warm figures of every folder, all loaded in this process and measured in turns (the order reversed every
    round), each the median of ``rounds``: prefill times, decode rates and the peak memory each decode adds, then
    the kernel launches, GPU time and wall time of one decode step (batch 1 and 64) (``points``: which of
    ``POINTS``). Figures go into ``results`` (by folder name, with the model's class), saved after each
    measurement."""
    import torch

    runners = {}
    if eager_copy:  # the last folder with shipped code, a second time with its decode graphs off
        shipped = [folder for folder in folders if "auto_map" in json.loads((folder / "config.json").read_text())]
        if not shipped:
            sys.exit("--eager-copy: no folder loads with compressor's shipped code")
        runner = runners[f"{shipped[-1].name}-eager"] = Runner(shipped[-1])
        mixers = [module for module in runner.model.modules() if hasattr(module, "use_decode_graph")]
        if not mixers:
            sys.exit(f"--eager-copy: {shipped[-1]}'s code has no decode graphs to turn off")
        for module in mixers:
            module.use_decode_graph = False
        results.setdefault(f"{shipped[-1].name}-eager", {})["class"] = type(runner.model).__name__ + ", graphs off"
    for folder in folders:
        runners[folder.name] = runner = Runner(folder)
        loaded = f"{type(runner.model).__module__}.{type(runner.model).__name__}"
        if results.get(folder.name, {}).get("class") not in (None, loaded):  # --resume of another run's figures
            results[folder.name] = {}
        results.setdefault(folder.name, {})["class"] = loaded
        stock = "auto_map" not in json.loads((folder / "config.json").read_text())
        if stock and loaded.startswith("compressor"):
            sys.exit(f"{folder} loaded as {loaded}, not its stock class: compressor.register() ran in this process")
    names = [folder.name for folder in folders] + [name for name in runners if name.endswith("-eager")]
    for name in names:
        results.setdefault(name, {})
    batches = [int(point) for point in points if point.isdigit()]
    for runner in runners.values():  # compile and autotune every shape before timing
        runner.prefill(runner.tokens(4, 2048))
        for batch in batches or [1]:
            runner.generate(runner.tokens(batch, PROMPT), 4)

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    for batch, length in PREFILL_SHAPES if "prefill" in points else []:
        key = f"prefill_{batch}x{length}_s"
        ids = {name: runner.tokens(batch, length) for name, runner in runners.items()}
        prefills = in_turns(runners, names, rounds, lambda n, r: timed(lambda: r.prefill(ids[n]), repeat=3))
        for name, values in prefills.items():
            results[name][key] = median(values)
            results[name][f"{key}_rounds"] = values
        save()
        log(f"  prefill {batch}x{length}: " + ", ".join(f"{n} {results[n][key] * 1e3:.1f} ms" for n in names))
    for batch in batches:
        key = f"decode_b{batch}_tok_s"
        ids = {name: runner.tokens(batch, PROMPT) for name, runner in runners.items()}

        def decode(name, runner, batch=batch, ids=ids) -> tuple[float, float]:
            prompt = ids[name]
            one = timed(lambda: runner.generate(prompt, 1), repeat=1)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            full = timed(lambda: runner.generate(prompt, NEW_TOKENS), repeat=1)
            return batch * (NEW_TOKENS - 1) / (full - one), (torch.cuda.max_memory_allocated() - base) / 2**30

        for name, values in in_turns(runners, names, rounds, decode).items():
            results[name][f"decode_b{batch}_graphs_so_far"] = graph_counts(runners[name].model)
            results[name][key] = median([rate for rate, _ in values])
            results[name][f"{key}_rounds"] = [rate for rate, _ in values]
            # the host's interruptions only ever add time: the best round is the least disturbed one
            results[name][f"decode_b{batch}_best_tok_s"] = max(rate for rate, _ in values)
            results[name][f"decode_b{batch}_extra_peak_gib"] = max(peak for _, peak in values)
        save()
        log(f"  decode batch {batch}: " + ", ".join(
            f"{n} {results[n][key]:.1f} tok/s (rounds {', '.join(f'{r:.1f}' for r in results[n][f'{key}_rounds'])}; "
            f"extra peak {results[n][f'decode_b{batch}_extra_peak_gib']:.2f} GiB)" for n in names))
    for batch in (1, 64) if "steps" in points else ():
        for name, runner in runners.items():
            results[name][f"decode_step_b{batch}"] = decode_step(runner, batch)
        save()
        log(f"  one decode step at batch {batch}: " + ", ".join(
            f"{n} " + " ".join(f"{k} {v}" for k, v in results[n][f"decode_step_b{batch}"].items() if k in STEP_TOTALS)
            for n in names))


STEP_TOTALS = ("launches", "gpu_ms", "wall_ms")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def on_device(events) -> list:
    """The device-side events (kernels, copies, memsets) of a profile's ``key_averages()``. Each CPU operator also
    carries the device time of the kernels it launched, so a sum over every event counts those kernels twice; and a
    ``record_function`` range (``MEASURED``) appears on the device too, as a user annotation spanning the kernels
    launched inside it, first to last (PyTorch's own tables leave those out of device totals, as this does)."""
    from torch.autograd import DeviceType

    return [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]


WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense",
         "aten::nonzero")
"""Host calls that wait for the GPU (explicit synchronisations, a tensor read as a Python number, ``nonzero``)."""
MEASURED = "bench_inference.measured"
"""The profiler range around the profiled call: waits are counted inside it (the harness's own are outside)."""


def profiled(fn) -> dict:
    """Kernel launches and GPU kernel time of one call of ``fn`` (after one untimed call), the host calls inside it
    that wait for the GPU, the kernels launched most often and those with the most GPU time (ms, launches), and,
    unprofiled, the time the host took to return from ``fn`` against the time until the GPU finished (close
    together: the host, not the GPU, sets the pace)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    returned = time.perf_counter()
    torch.cuda.synchronize()
    finished = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function(MEASURED):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = on_device(events)
    call = next(e.time_range for e in prof.events() if e.name == MEASURED)
    waits = [e.name for e in prof.events()
             if e.name in WAITS and call.start <= e.time_range.start and e.time_range.end <= call.end]
    return {"launches": sum(e.count for e in events if e.key in LAUNCHES),
            "gpu_ms": round(sum(e.self_device_time_total for e in kernels) / 1e3, 3),
            "host_ms": round((returned - started) * 1e3, 3), "wall_ms": round((finished - started) * 1e3, 3),
            "waits": {name: waits.count(name) for name in sorted(set(waits))},
            "most_launched": most_launched(kernels, 12), "most_gpu_time": most_gpu_time(kernels, 16)}


def most_launched(kernels: list, count: int) -> list[tuple[str, int]]:
    """(name, launches) of the ``count`` device events of ``on_device`` launched most often."""
    return [(e.key[:60], e.count) for e in sorted(kernels, key=lambda e: -e.count)][:count]


def most_gpu_time(kernels: list, count: int) -> list[tuple[str, float, int]]:
    """(name, GPU ms, launches) of the ``count`` device events of ``on_device`` with the most GPU time."""
    return [(e.key[:60], round(e.self_device_time_total / 1e3, 3), e.count)
            for e in sorted(kernels, key=lambda e: -e.self_device_time_total)][:count]


def decode_step(runner: Runner, batch: int) -> dict:
    """Kernel launches, GPU kernel time and wall time of one decode step: ``generate`` of 16 tokens minus 1 token,
    over 15 (launches and GPU time profiled, wall time not: the median of 5), and the kernels with the most GPU
    time and the most launched over the 16 tokens."""
    from torch.profiler import ProfilerActivity, profile

    prompt = runner.tokens(batch, PROMPT)
    totals, wall = {}, {}
    for new in (1, 16):
        wall[new] = timed(lambda: runner.generate(prompt, new), repeat=5)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            runner.generate(prompt, new)
        events = prof.key_averages()
        on_gpu = on_device(events)
        totals[new] = (sum(e.count for e in events if e.key in LAUNCHES),
                       sum(e.self_device_time_total for e in on_gpu) / 1e3)
        if new == 16:
            top, kernels = most_gpu_time(on_gpu, 8), most_launched(on_gpu, 16)
    return {"launches": round((totals[16][0] - totals[1][0]) / 15, 1),
            "gpu_ms": round((totals[16][1] - totals[1][1]) / 15, 3),
            "wall_ms": round((wall[16] - wall[1]) / 15 * 1e3, 3), "top_gpu_16_tokens": top,
            "most_launched_16_tokens": kernels}


MARKER = ".bench_inference"
"""The file that marks a Triton cache folder as this script's (the only kind it empties)."""


def measure(folder: Path, cache: Path) -> dict:
    """``measure_cold`` in a fresh process whose Triton cache ``cache`` starts empty (a folder this script made
    earlier is emptied; any other existing folder is refused)."""
    if cache.exists():
        if not (cache / MARKER).is_file():
            sys.exit(f"{cache} exists and was not made by this script; move it away or choose another --out.")
        shutil.rmtree(cache)
    cache.mkdir(parents=True)
    (cache / MARKER).touch()
    report = cache.parent / f"{cache.name}.json"
    subprocess.run([sys.executable, __file__, "--one", str(folder), "--out", str(report)], check=True,
                   env={**os.environ, "TRITON_CACHE_DIR": str(cache)})
    return json.loads(report.read_text())


def expected_decode_ratios(folders: list[Path]) -> dict:
    """Time ratio of a decode step over the first folder's, from the bytes a step moves at each batch size: the
    bf16 weights once, and every sequence's float32 recurrent state read and written once. Run in a child process:
    reading the folders registers compressor's model classes with transformers' Auto classes, after which the
    source would load with the shipped code instead of its stock class."""
    from compressor.accounting import parameter_count, state_bytes
    from compressor.loading import load_structure

    sizes = {}
    for folder in folders:
        structure = load_structure(str(folder))
        state_float32 = state_bytes(structure) * 4 // structure.save_dtype.itemsize
        sizes[folder.name] = (2 * parameter_count(structure.model), 2 * state_float32)
    weights, state = sizes[folders[0].name]
    return {name: {f"b{batch}": (w + batch * s) / (weights + batch * state) for batch in (*DECODE_BATCHES, 1024)}
            for name, (w, s) in list(sizes.items())[1:]}


def versions() -> dict:
    import torch

    from compressor.accounting import versions as package_versions

    return {"gpu": torch.cuda.get_device_name(), "python": sys.version.split()[0], **package_versions()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", type=Path, help="the source first, then the folders cut from it")
    parser.add_argument("--build", type=Path, help="build and prune a random 2.2B model in this folder")
    parser.add_argument("--small", action="store_true", help="with --build: a small model, to try the script")
    parser.add_argument("--no-stock", action="store_true", help="with --build: no stock-layout folder")
    parser.add_argument("--synthetic-stats", action="store_true",
                        help="with --build: prune from random statistics (no calibration, no prune timing)")
    parser.add_argument("--phase", choices=["cold", "warm", "both", "build"], default="both",
                        help="cold: first calls, a fresh process per folder; warm: every folder in one process; "
                             "build: with --build, the folders (and the prunes' times) only")
    parser.add_argument("--rounds", type=int, default=3, help="turns of the warm measurements (median)")
    parser.add_argument("--points", default=",".join(POINTS),
                        help="warm phase: what to measure: prefill, steps, decode batch sizes (a 10-minute device "
                             "call holds about two decode batch sizes for three 2.2B models)")
    parser.add_argument("--eager-copy", action="store_true",
                        help="warm phase: also the last folder with its decode graphs off")
    parser.add_argument("--resume", type=Path, help="with --build: figures of an earlier run (not measured again)")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--expected-ratios", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if any(point not in POINTS[:2] and not (point.isdigit() and int(point) > 0) for point in args.points.split(",")):
        parser.error(f"--points takes prefill, steps and decode batch sizes, got {args.points}")
    if args.phase == "build" and not args.build:
        parser.error("--phase build needs --build WORK")
    if args.expected_ratios:
        print(json.dumps(expected_decode_ratios(args.folders)))
        return
    if args.one:
        args.out.write_text(json.dumps(measure_cold(args.one, Path(os.environ["TRITON_CACHE_DIR"]))))
        return
    work = args.build or args.out.parent
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
        build(args.build, args.small, not args.no_stock, args.synthetic_stats, results, save)
        folders = [args.build / name for name in ("source", "pruned", "pruned-stock")[: 2 if args.no_stock else 3]]
    if args.phase == "build":
        return
    names = [folder.name for folder in folders]
    if "expected_decode_time_ratio" not in results:  # in a child: it registers compressor's classes
        child = subprocess.run([sys.executable, __file__, *map(str, folders), "--expected-ratios", "--out", "-"],
                               check=True, capture_output=True, text=True)
        results["expected_decode_time_ratio"] = json.loads(child.stdout.strip().splitlines()[-1])
    save()
    if args.phase in ("cold", "both"):
        for folder in folders:
            if folder.name not in results.get("cold", {}):
                log(f"cold start of {folder}")
                results.setdefault("cold", {})[folder.name] = measure(folder, work / f"triton-{folder.name}")
                save()
    if args.phase in ("warm", "both"):
        # the cold processes' caches are not merged into this one's: both warm phases that did so (runs 13 and 23)
        # died of a segmentation fault in their first prefill
        measure_side_by_side(folders, args.rounds, results.setdefault("warm", {}), save,
                             tuple(args.points.split(",")), args.eager_copy)
        from compressor.tuned_kernels import autotuned_fla_configs

        results.setdefault("fla_configs_warm", {})[args.points] = autotuned_fla_configs()  # what these calls ran with
        save()
    for part in ("cold", "warm"):
        figures = results.get(part, {})
        if names[0] not in figures:
            continue
        for name in [name for name in figures if name != names[0] and (name in names or name.endswith("-eager"))]:
            ratios = {key: figures[name][key] / figures[names[0]][key] for key in figures.get(name, {})
                      if key.endswith(("_s", "_gib")) and figures[names[0]].get(key)}
            ratios.update({key.replace("_tok_s", "_time"): figures[names[0]][key] / figures[name][key]
                           for key in figures.get(name, {}) if key.endswith("_tok_s") and figures[names[0]].get(key)})
            results.setdefault("ratios", {})[f"{part}: {name} / {names[0]}"] = ratios
            log(f"{part}: {name} / {names[0]}: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    save()


if __name__ == "__main__":
    main()
