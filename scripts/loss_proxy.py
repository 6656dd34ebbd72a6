"""How well do layer-local measures rank heads against the ``loss`` scorer (each head's effect on the final loss)?

A layer-by-layer run cannot measure the final loss once per head without running every later layer once per head.
Two measures that need the head's own layer only:

- ``output``: the mean squared norm of the head's contribution to its mixer's output, out_proj[:, head] · o_head
  (one forward pass: what masking the head removes from the mixer's output, exactly);
- ``layer``: the mean squared change of its decoder layer's output (mixer, residual and MLP) when the head alone is
  masked (one pass of that layer per head, on the layer's recorded inputs).

For the fixture (trained) and the tiny random families, prints the Spearman correlation of each measure with the
``loss`` scores over all heads, and the mean of the per-layer correlations, as one JSON object:

    python scripts/loss_proxy.py [--json scripts/results/loss_proxy_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two [n] vectors (ties broken by order; n > 1)."""
    ranks = lambda x: x.argsort().argsort().double()  # noqa: E731
    ra, rb = ranks(a), ranks(b)
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


@torch.no_grad()
def output_measure(model, family, tokens: torch.Tensor) -> dict[int, torch.Tensor]:
    """Layer -> [H] mean over tokens of ||out_proj[:, head] o_head||²."""
    from compressor.layers import linear_layers

    mixers = linear_layers(model, family)
    sums: dict[int, torch.Tensor] = {}

    def hook_for(layer, mixer):
        def hook(module, args):
            heads = args[0].unflatten(-1, (mixer.num_v_heads, mixer.head_v_dim))  # [B, T, H, d_v]
            weight = module.weight.unflatten(1, (mixer.num_v_heads, mixer.head_v_dim))  # [D, H, d_v]
            contribution = torch.einsum("bthv,dhv->bthd", heads, weight)
            sums[layer] = sums.get(layer, 0) + contribution.pow(2).sum(-1).mean((0, 1))
        return hook

    handles = [m.out_proj.register_forward_pre_hook(hook_for(i, m)) for i, m in mixers.items()]
    try:
        model(input_ids=tokens, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return sums


@torch.no_grad()
def layer_measure(model, family, tokens: torch.Tensor) -> dict[int, torch.Tensor]:
    """Layer -> [H] mean squared change of the decoder layer's output when the head alone is masked."""
    from compressor.layers import linear_layers
    from compressor.selection import masked_heads

    mixers = linear_layers(model, family)
    inputs: dict[int, tuple] = {}
    handles = [model.model.layers[i].register_forward_pre_hook(
        lambda module, args, kwargs, i=i: inputs.__setitem__(i, (args, kwargs)), with_kwargs=True) for i in mixers]
    try:
        model(input_ids=tokens, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    result = {}
    for index, mixer in mixers.items():
        args, kwargs = inputs[index]
        layer = model.model.layers[index]
        first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
        reference = first(layer(*args, **kwargs))
        changes = []
        for head in range(mixer.num_v_heads):
            with masked_heads(model, family, {index: [head]}):
                changes.append((first(layer(*args, **kwargs)) - reference).pow(2).sum(-1).mean())
        result[index] = torch.stack(changes)
    return result


def correlations(loss: dict, measure: dict) -> dict:
    layers = sorted(loss)
    flat = lambda d: torch.cat([d[i].double().flatten() for i in layers])  # noqa: E731
    per_layer = [spearman(loss[i].double(), measure[i].double()) for i in layers if loss[i].numel() > 1]
    return {"all_heads": spearman(flat(loss), flat(measure)), "mean_per_layer": sum(per_layer) / len(per_layer)}


def models():
    """(name, model, family, token windows [2, 256])."""
    from tiny_fla import tiny_fla_model
    from tiny_hybrids import tiny_hybrid
    from tiny_models import tiny_model

    from compressor.calibration_text import calibration_windows
    from compressor.families import family_for
    from compressor.loading import load_model
    from compressor.settings import CalibrationSettings

    fixture = load_model(str(ROOT / "tests" / "fixtures" / "qwen35-tiny-6m"), "cpu")
    text, _ = calibration_windows(CalibrationSettings(samples=2, seq_len=256), fixture.tokenizer)
    yield "fixture (trained Qwen3.5)", fixture.model, fixture.family, text
    tiny = [("qwen3_5", tiny_model("qwen3_5")), ("qwen3_next_moe", tiny_model("qwen3_next_moe")),
            ("qwen3_5_moe", tiny_hybrid("qwen3_5_moe")), ("olmo_hybrid", tiny_hybrid("olmo_hybrid")),
            ("kimi_linear", tiny_hybrid("kimi_linear"))]
    try:
        tiny += [("fla gated_deltanet", tiny_fla_model("gated_deltanet_gva"))]
    except ImportError:
        pass
    for name, model in tiny:
        tokens = torch.randint(3, model.config.vocab_size, (2, 256), generator=torch.Generator().manual_seed(0))
        yield name, model, family_for(model.config), tokens


def main() -> None:
    from compressor.selection import loss_scores

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    figures = {"torch": torch.__version__, "windows": "2 x 256 tokens", "models": {}}
    for name, model, family, tokens in models():
        loss = loss_scores(model, family, tokens, batch_size=16)
        figures["models"][name] = {
            "heads": sum(v.numel() for v in loss.values()),
            "output": correlations(loss, output_measure(model, family, tokens)),
            "layer": correlations(loss, layer_measure(model, family, tokens)),
        }
        print(name, json.dumps(figures["models"][name]), flush=True)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
