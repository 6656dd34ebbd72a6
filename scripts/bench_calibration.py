"""Cost of `compress analyze` calibration against a plain forward pass, and where it goes.

A random-init 1B-class Qwen3-Next-shaped model (18 linear-attention layers of 16 heads with 128 × 128 states) in
bf16 on a GPU, a batch of 4 × 2048 tokens. Measures, and prints as one JSON object (also written to --out):

- ``plain_forward_s``: the model's forward pass (fla's bf16 kernels, no states); and the same through the last
  linear-attention layer only (the part of it that calibration runs);
- ``states_only``: the forward pass that also hands every chunk state to a sink doing nothing, with the states
  from fla's kernels in float32 (the CUDA path, dot products in ``--precision``) and from the PyTorch
  recurrence (the CPU path, on GPU);
- ``analyze``: ``collect_state_statistics`` (forward + spectra + metrics) at log-spaced steps and every 64 tokens,
  with the spectra on a side stream (``overlap``; calibration takes none when every state fits in one group, as
  the log steps' do here) and without, and whether the two give identical statistics;
- ``spectra_one_step``: the spectra of one step's states (all layers × batch × heads): svdvals, float64
  ``torch.linalg.eigvalsh``, the Triton kernels (``gram``; ``metric_table``: with the metrics), and on the CPU; and
  the kernels' metrics against the SVD's;
- ``rank_agreement``: the share of (sequence, layer, head, step) states whose threshold rank from fla's float32
  states equals the PyTorch float32 reference's; and the share whose kernel threshold rank equals svdvals' on
  the same states;
- ``naive_baseline``: a per-token recurrence (the PyTorch decode step in a loop) plus svdvals every 64th token,
  the naive way to get the same statistics: measured forward + 32 × the measured svdvals time of one step.

    python scripts/bench_calibration.py --out results.json --fixture tests/fixtures/qwen35-tiny-6m   # on a GPU
    python scripts/bench_calibration.py --quick ...   # without the slow baselines (svdvals, CPU, per-token)
    python scripts/bench_calibration.py --timing-only   # only the forward, states and analyze timings
    python scripts/bench_calibration.py --analyze-only  # only the forward and analyze timings (printed as measured)
    python scripts/bench_calibration.py --small    # 4 layers of 4 heads, 2 × 256 tokens, any device: a smoke run
    python scripts/bench_calibration.py --model tests/fixtures/qwen35-tiny-6m --device cpu --timing-only  # CPU

Triton's in-memory cache reuses a compiled kernel whatever the dot precision of a later call: compare precisions in
separate processes (its disk cache keys them apart).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import types
from pathlib import Path

import torch

import compressor.modeling.gated_delta as gated_delta
import compressor.state_capture as state_capture
from compressor.calibration import GROUP_MATRICES, collect_state_statistics, states_handed_to
from compressor.families import family_for
from compressor.loading import load_model
from compressor.metrics import METRICS, metric_table, singular_values
from compressor.accounting import versions
from compressor.settings import measured_steps
from compressor.layers import linear_layers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device: torch.device, repeats: int, warm_up: bool = True) -> float:
    """Best wall time in seconds of ``repeats`` calls after one warm-up (if ``warm_up``)."""
    if warm_up:
        function()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def output_in_precision(precision: str) -> None:
    """Make the fla path compute the layer's output with Triton's float32 dot products in ``precision`` (calibration
    leaves it to Triton's default)."""
    output = state_capture._fla_fwd_o
    language = state_capture._triton.knobs.language

    def output_at(**tensors):
        previous, language.fp32_default = language.fp32_default, precision
        try:
            return output(**tensors)
        finally:
            language.fp32_default = previous

    state_capture._fla_fwd_o = output_at


def analyze_timings(model, family, ids, plain: float, log_times: list[int], every_times: list[int],
                    repeats: int, group: int = GROUP_MATRICES) -> dict:
    """``collect_state_statistics`` timed at log-spaced steps and every 64 tokens, with ``overlap`` (the side stream,
    where calibration takes it: not when every state fits in one group of ``group``) and without, and whether both
    give identical statistics. Each figure is also printed to stderr as it is measured."""
    analyze, statistics = {}, {}
    collect_state_statistics(model, family, ids[:1, :256], progress=False)  # compile the float32 kernels
    for overlap in (True, False):
        for name, times in (("log_steps", log_times), ("every_64", every_times)):
            run = lambda: collect_state_statistics(
                model, family, ids, batch_size=ids.shape[0], progress=False, times=times, overlap=overlap, group=group)
            seconds = timed(run, ids.device, repeats)
            key = f"{name}{'' if overlap else '_no_overlap'}"
            analyze[key] = {"steps": len(times), "seconds": seconds, "ratio_to_plain": seconds / plain,
                            "tokens_per_second": ids.numel() / seconds}
            print(json.dumps({key: analyze[key]}), file=sys.stderr, flush=True)
            statistics[key] = run()
    analyze["overlap_changes_no_statistic"] = all(
        torch.equal(getattr(statistics[n], part)[m].nan_to_num(),
                    getattr(statistics[f"{n}_no_overlap"], part)[m].nan_to_num())
        for n in ("log_steps", "every_64") for part in ("mean", "std") for m in statistics[n].mean)
    return analyze


def model_config(small: bool):
    """Qwen3-Next-shaped config: 24 layers (every 4th full attention), hidden 2048, 16 heads of 128 (small: 4 layers
    of hidden 256, 4 heads of 32)."""
    from transformers import Qwen3NextConfig

    layers, hidden, heads, dim = (4, 256, 4, 32) if small else (24, 2048, 16, 128)
    return Qwen3NextConfig(
        vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
        layer_types=["linear_attention" if (i + 1) % 4 else "full_attention" for i in range(layers)],
        num_attention_heads=heads, num_key_value_heads=2, head_dim=dim, linear_num_key_heads=heads,
        linear_num_value_heads=heads, linear_key_head_dim=dim, linear_value_head_dim=dim, num_experts=0,
        mlp_only_layers=list(range(layers)), max_position_embeddings=4096,
    )


class StatePath:
    """Context: route calibration states through ``path``: 'fla' (float32 inputs, dot products in
    ``state_capture.STATES_DOT_PRECISION``), 'fla-tf32' (fla's default precision, float32 inputs) or 'torch' (the
    PyTorch reference)."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        self.saved = state_capture.HAS_FLA_STATES, getattr(state_capture, "_triton", None)
        if self.path == "torch":
            state_capture.HAS_FLA_STATES = False
        elif self.path == "fla-tf32":  # the knob is set on a stand-in, so Triton keeps its default (TF32)
            state_capture._triton = types.SimpleNamespace(knobs=types.SimpleNamespace(
                language=types.SimpleNamespace(fp32_default=None)))
        return self

    def __exit__(self, *exc):
        state_capture.HAS_FLA_STATES, state_capture._triton = self.saved


def capture(model, family, ids, sink) -> None:
    """One forward pass of ``ids`` with ``sink`` on every mixer."""
    with states_handed_to(sink, linear_layers(model, family)), torch.no_grad():
        model.model(input_ids=ids, use_cache=False)


def states_at(model, family, ids, times: list[int]) -> torch.Tensor:
    """States at ``times`` of every layer: [layers, B, H, len(times), d_k, d_v] float32 (on the model's device)."""
    index = torch.tensor([(t + 63) // 64 - 1 for t in times], device=ids.device)
    kept = []
    capture(model, family, ids, lambda layer, states: kept.append(states.index_select(2, index)))
    return torch.stack(kept)


def threshold_ranks(states: torch.Tensor, method: str, eps: float = 1e-4) -> torch.Tensor:
    sigma = singular_values(states.flatten(0, -3), method)
    return (sigma > eps * sigma[:, :1]).sum(-1)


def metrics_against_svd(states: torch.Tensor, eps: float = 1e-4) -> dict:
    """The device's metric table (on CUDA: the Triton kernels) against the SVD's: the share of threshold ranks equal
    to those of float64 ``svdvals``, and the largest relative difference of every other metric from the CPU path's
    (float32 ``svdvals``)."""
    table = metric_table(states, eps)
    sigma = torch.linalg.svdvals(states.double())
    reference = metric_table(states.cpu(), eps, method="svd").to(table)
    exact_ranks = (sigma > eps * sigma[..., :1]).sum(-1)
    rank = METRICS.index("threshold_rank")
    result = {"states": states.shape[0],
              "threshold_rank_equal_share": (table[:, rank] == exact_ranks).float().mean().item()}
    for i, name in enumerate(METRICS):
        if i != rank:
            scale = reference[:, i].abs().clamp_min(1e-30)
            result[f"{name}_max_relative_diff"] = ((table[:, i] - reference[:, i]).abs() / scale).max().item()
    return result


def cpu_spectra(states: torch.Tensor, method: str) -> torch.Tensor:
    """Spectra on the CPU (all its threads) of GPU states, the transfer included."""
    return singular_values(states.cpu(), method)


def random_input_states(device: torch.device, path: str, batch: int, length: int, heads: int, dim: int):
    """Chunk states of the recurrence on random inputs with slow decay (states of high rank, the hard case):
    [B, H, N, d, d] float32 through ``path``."""
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, length, heads, dim, device=device, generator=generator) for _ in range(3))
    g = -0.05 * torch.rand(batch, length, heads, device=device, generator=generator)
    beta = torch.rand(batch, length, heads, device=device, generator=generator)
    with StatePath(path):
        return state_capture.gated_delta_rule_with_states(q, k, v, g, beta)[2]


def rank_agreement(model, family, ids, times: list[int], path: str) -> dict:
    """Share of states whose threshold rank through ``path`` equals the PyTorch float32 reference's: the
    model's states at ``times``, and random-input states (4 × 2048 tokens, 16 heads of 128) every 256 tokens."""
    with StatePath("torch"):
        reference = threshold_ranks(states_at(model, family, ids, times), "gram")
    with StatePath(path):
        ranks = threshold_ranks(states_at(model, family, ids, times), "gram")
    shape = (4, 2048, 16, 128) if ids.shape[1] >= 2048 else (2, 256, 4, 32)
    every = slice(3, None, 4)
    random_reference = threshold_ranks(random_input_states(ids.device, "torch", *shape)[:, :, every], "gram")
    random_ranks = threshold_ranks(random_input_states(ids.device, path, *shape)[:, :, every], "gram")
    return {
        "path": path,
        "model_states": int(reference.numel()),
        "model_mean_threshold_rank_reference": reference.float().mean().item(),
        "model_equal_share": (ranks == reference).float().mean().item(),
        "model_max_abs_diff": (ranks - reference).abs().max().item(),
        "random_input_states": int(random_reference.numel()),
        "random_input_mean_threshold_rank_reference": random_reference.float().mean().item(),
        "random_input_equal_share": (random_ranks == random_reference).float().mean().item(),
        "random_input_max_abs_diff": (random_ranks - random_reference).abs().max().item(),
    }


def fixture_agreement(path: str, device: torch.device, path_name: str = "fla") -> dict:
    """Threshold-rank agreement of fla's float32 IEEE states with the PyTorch reference on a trained model in
    float32, every 64 tokens of 4 embedded-text windows of 1024 tokens."""
    from compressor.calibration_text import read_text, token_windows
    from compressor.loading import load_model

    loaded = load_model(path, str(device), "float32")
    ids = token_windows(loaded.tokenizer, read_text(None)[0], 4, 1024, seed=0).to(device)
    times = measured_steps(1024)
    ranks = {}
    for name in ("torch", path_name):
        with StatePath(name):
            ranks[name] = threshold_ranks(states_at(loaded.model, loaded.family, ids, times), "gram")
    return {
        "model": path,
        "states": int(ranks["torch"].numel()),
        "mean_threshold_rank_reference": ranks["torch"].float().mean().item(),
        "path": path_name,
        "equal_share": (ranks[path_name] == ranks["torch"]).float().mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny model and batch, to check the script runs")
    parser.add_argument("--model", default=None,
                        help="a saved model folder (e.g. tests/fixtures/qwen35-tiny-6m) instead of the random-init one")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of the short measurements")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--agreement-only", default=None, choices=["fla", "fla-tf32"],
                        help="only the rank agreement of this state path (run each in a fresh process: Triton "
                             "caches compiled kernels without their dot precision)")
    parser.add_argument("--analyze-only", action="store_true",
                        help="only the plain forward pass and the analyze timings")
    parser.add_argument("--group", type=int, default=GROUP_MATRICES,
                        help="matrices per spectra batch (calibration.GROUP_MATRICES)")
    parser.add_argument("--quick", action="store_true",
                        help="skip the slow baselines (svdvals, CPU spectra, the per-token recurrence)")
    parser.add_argument("--timing-only", action="store_true",
                        help="with --quick: skip the rank agreement, the PyTorch state path and eigvalsh too")
    parser.add_argument("--precision", default=state_capture.STATES_DOT_PRECISION, choices=["ieee", "tf32x3"],
                        help="Triton's float32 dot precision for the states (state_capture.STATES_DOT_PRECISION)")
    parser.add_argument("--output-precision", default="default", choices=["default", "ieee", "tf32x3"],
                        help="Triton's float32 dot precision for the layer's output while calibration reads the states "
                             "(default: Triton's own, TF32 on NVIDIA GPUs since Ampere)")
    parser.add_argument("--fixture", default=None,
                        help="also measure the rank agreement on this trained model (4 x 1024 embedded-text tokens)")
    args = parser.parse_args()
    args.quick = args.quick or args.timing_only
    state_capture.STATES_DOT_PRECISION = args.precision
    if args.output_precision != "default":
        output_in_precision(args.output_precision)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32  # bf16 matmuls crawl on CPUs
    batch, length = (2, 256) if args.small else (4, 2048)
    torch.manual_seed(0)
    if args.model:
        loaded = load_model(args.model, str(device), str(dtype).removeprefix("torch."))
        model, family, config = loaded.model.eval(), loaded.family, loaded.model.config
    else:
        config = model_config(args.small)
        family = family_for(config)
        with device:  # the family's class (what `compress analyze` loads), not whatever the Auto classes map to
            model = family.model_class._from_config(config, dtype=dtype).eval()
    mixers = linear_layers(model, family)
    ids = torch.randint(0, config.vocab_size, (batch, length), device=device)
    log_times, every_times = measured_steps(length, steps="log"), measured_steps(length, 64)
    results = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "versions": versions(),
        "states_dot_precision": args.precision,
        "output_dot_precision": args.output_precision,
        "group_matrices": args.group,
        "model_class": type(model).__name__,
        "dtype": str(dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch": [batch, length],
        "linear_layers": len(mixers),
        "heads_per_layer": next(iter(mixers.values())).num_v_heads,
        "log_steps": log_times,
        "every_64_steps": len(every_times),
    }

    def report_and_exit(*_):  # under `timeout`, still print what was measured
        print(json.dumps(results, indent=2), flush=True)
        sys.exit(124)

    signal.signal(signal.SIGTERM, report_and_exit)
    with torch.no_grad():
        plain = timed(lambda: model.model(input_ids=ids, use_cache=False), device, args.repeats)
        layers = model.model.layers
        model.model.layers = layers[: max(mixers) + 1]  # calibration stops after the last linear-attention layer
        try:
            through_last = timed(lambda: model.model(input_ids=ids, use_cache=False), device, args.repeats)
        finally:
            model.model.layers = layers
    results["plain_forward_s"] = plain
    results["plain_forward_through_last_linear_layer"] = {"seconds": through_last, "ratio_to_plain": through_last / plain}
    print(json.dumps({"plain_forward_s": plain}), file=sys.stderr, flush=True)
    if args.analyze_only:
        results["analyze"] = analyze_timings(model, family, ids, plain, log_times, every_times, args.repeats,
                                             args.group)
        print(json.dumps(results, indent=2))
        return

    last = states_at(model, family, ids, [length]).flatten(0, -3)  # one step's states, fla float32
    if not args.timing_only:
        results["rank_agreement"] = rank_agreement(model, family, ids, log_times, args.agreement_only or "fla")
        results["rank_agreement"]["gram_vs_svd_equal_share_last_step"] = (
            threshold_ranks(last, "gram") == threshold_ranks(last, "svd")).float().mean().item()
    if args.agreement_only:
        if args.fixture:
            results["rank_agreement_fixture"] = fixture_agreement(args.fixture, device, args.agreement_only)
        print(json.dumps(results, indent=2))
        return

    states_only = {}
    for path in ("fla",) if args.timing_only else ("fla", "torch"):
        with StatePath(path):
            seconds = timed(lambda: capture(model, family, ids, lambda layer, states: None), device, args.repeats)
        states_only[path] = {"seconds": seconds, "ratio_to_plain": seconds / plain}
    results["states_only"] = states_only

    spectra = {"states": list(last.shape)}
    if not args.quick:
        spectra["svd_gpu_s"] = timed(lambda: singular_values(last, "svd"), device, 1)
    if not args.timing_only:
        gram = last.double().mT @ last.double()
        spectra["eigvalsh_float64_gpu_s"] = timed(lambda: torch.linalg.eigvalsh(gram), device, 1)
    spectra["gram_float64_gpu_s"] = timed(lambda: singular_values(last, "gram"), device, args.repeats)
    spectra["metric_table_gpu_s"] = timed(lambda: metric_table(last), device, args.repeats)
    if not args.timing_only:
        spectra["metrics_kernel_vs_float64_svd"] = metrics_against_svd(last)
    if not args.timing_only:
        reference = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(-1)
        spectra["gram_vs_eigvalsh_max_sigma_diff_over_top"] = (
            (singular_values(last, "gram").double() - reference).abs().amax(-1) / reference[:, 0].clamp_min(1e-300)
        ).max().item()
    if not args.quick:
        spectra["svd_cpu_s"] = timed(lambda: cpu_spectra(last, "svd"), device, 1)
        spectra["gram_float64_cpu_s"] = timed(lambda: cpu_spectra(last, "gram"), device, 1)
        spectra["cpu_threads"] = torch.get_num_threads()
    results["spectra_one_step"] = spectra

    analyze = results["analyze"] = analyze_timings(model, family, ids, plain, log_times, every_times, args.repeats,
                                                   args.group)

    if not args.quick:
        saved = gated_delta.HAS_FLA, gated_delta.chunk_gated_delta_rule_torch
        gated_delta.HAS_FLA = False  # the PyTorch path; with a stand-in, every chunked call runs token by token
        gated_delta.chunk_gated_delta_rule_torch = (
            lambda *a, return_chunk_states=False, **k: (*gated_delta.recurrent_gated_delta_rule_torch(*a, **k), None))
        try:
            with torch.no_grad():
                naive_forward = timed(lambda: model.model(input_ids=ids, use_cache=False), device, 1, warm_up=False)
        finally:
            gated_delta.HAS_FLA, gated_delta.chunk_gated_delta_rule_torch = saved
        naive = naive_forward + len(every_times) * spectra["svd_gpu_s"]
        results["naive_baseline"] = {
            "per_token_forward_s": naive_forward,
            "svdvals_steps": len(every_times),
            "total_s": naive,
            "speedup_every_64": naive / analyze["every_64"]["seconds"],
            "speedup_log_steps": naive / analyze["log_steps"]["seconds"],
        }
    if args.fixture:
        results["rank_agreement_fixture"] = fixture_agreement(args.fixture, device)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
