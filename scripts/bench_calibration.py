"""Cost of analyze-style state capture against a plain forward, with svdvals or float64 Gram eigvalsh spectra.

A random-init 1B-class Qwen3-Next-shaped model (18 linear-attention layers of 16 heads with 128 × 128 states) in
bf16 on a GPU; a batch of 4 × 2048 tokens, states measured every 64 tokens. Prints one JSON object: device,
versions, the plain forward time, the capture time per spectra method, and the spectra alone on one step's states.

    python scripts/bench_calibration.py            # on a GPU (about a minute on an H100)
    python scripts/bench_calibration.py --small    # a 2-layer model, 2 × 256 tokens, on any device: checks it runs
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import torch

import compressor.calibration
from compressor.calibration import collect_state_statistics
from compressor.families import family_for
from compressor.metrics import singular_values, state_metrics
from compressor.pipeline import versions
from compressor.slicing import linear_layers

METHODS = ("svd", "gram")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device: torch.device, repeats: int) -> float:
    """Best wall time in seconds of ``repeats`` calls after one warm-up."""
    function()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny model and batch, to check the script runs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of the forward and spectra")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16  # bf16 matmuls crawl on CPUs
    batch, length = (2, 256) if args.small else (4, 2048)
    config = model_config(args.small)
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    family = family_for(config)
    mixer = next(iter(linear_layers(model, family).values()))
    ids = torch.randint(0, config.vocab_size, (batch, length), device=device)
    with torch.no_grad():
        plain = timed(lambda: model.model(input_ids=ids, use_cache=False), device, args.repeats)

    # one step's states of the whole model: [layers · batch · heads, d_k, d_v], float32 as the sink sees them
    count = len(linear_layers(model, family)) * batch * mixer.num_v_heads
    states = torch.randn(count, mixer.head_k_dim, mixer.head_v_dim, device=device)
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": versions(),
        "dtype": str(dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch": [batch, length],
        "linear_layers": len(linear_layers(model, family)),
        "steps_per_sequence": length // 64,
        "plain_forward_s": plain,
        "spectra_one_step": {"states": list(states.shape)},
        "capture": {},
    }
    original = compressor.calibration.state_metrics
    try:
        for method in METHODS:
            results["spectra_one_step"][f"{method}_s"] = timed(lambda: singular_values(states, method), device,
                                                               args.repeats)
            compressor.calibration.state_metrics = partial(state_metrics, method=method)
            start = time.perf_counter()  # one run: with svdvals on a GPU it takes minutes
            collect_state_statistics(model, family, ids, batch_size=batch, progress=False)
            synchronize(device)
            capture = time.perf_counter() - start
            results["capture"][method] = {"forward_with_capture_s": capture, "overhead_ratio": capture / plain}
    finally:
        compressor.calibration.state_metrics = original
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
