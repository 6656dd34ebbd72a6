"""Random-initialised tiny fla models (fla's own model classes, loaded through compressor's routed subclasses)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from tiny_models import spread_constant_vectors
from transformers import AutoModelForCausalLM

import compressor
from compressor.slicing import stock_base

compressor.register()  # the shipped classes, for stock model types too

FIXTURE = Path(__file__).parent / "fixtures" / "qwen35-tiny-6m"
FIXTURE_VOCAB = 8192

COMMON = dict(hidden_size=64, num_hidden_layers=3, vocab_size=96, hidden_ratio=2, fuse_cross_entropy=False,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _config(model_type: str, fields: dict, **overrides):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**COMMON, **fields, **overrides})


CONFIGS = {
    # 3 key heads, 6 value heads (value head j reads key head j // 2); d_k 8, d_v 12.
    "gated_deltanet_gva": lambda **kw: _config("gated_deltanet", dict(num_heads=3, num_v_heads=6, head_dim=8,
                                                                      expand_v=1.5), **kw),
    # 4 heads, no grouping, no output gate.
    "gated_deltanet": lambda **kw: _config("gated_deltanet", dict(num_heads=4, head_dim=16, expand_v=1.0,
                                                                  use_gate=False), **kw),
    # 4 heads, d_k 8, d_v 16 (through expand_k/expand_v); output gate.
    "delta_net": lambda **kw: _config("delta_net", dict(num_heads=4, expand_k=0.5, expand_v=1.0, use_gate=True),
                                      **kw),
    # relu feature map, sum-normalised q/k, beta in (0, 2), no output gate.
    "delta_net_relu_sum": lambda **kw: _config("delta_net", dict(num_heads=4, expand_k=0.5, expand_v=1.0,
                                                               qk_activation="relu", qk_norm="sum",
                                                               allow_neg_eigval=True), **kw),
    # 4 heads, d_k 8, d_v 16; fused gated norm, no convolutions (fla's defaults).
    "gla": lambda **kw: _config("gla", dict(num_heads=4, expand_k=0.5, expand_v=1.0), **kw),
    # Short convolutions, relu feature map, unfused norm then swish gate, clamped decay.
    "gla_conv_relu": lambda **kw: _config("gla", dict(num_heads=4, expand_k=0.5, expand_v=1.0, use_short_conv=True,
                                                    feature_map="relu", fuse_norm=False, clamp_min=-4.0), **kw),
    # 3 key heads, 6 value heads, d_k 8, d_v 12; fla's softplus decay.
    "kda_gva": lambda **kw: _config("kda", dict(num_heads=3, num_v_heads=6, head_dim=8, expand_v=1.5), **kw),
    # 4 heads, bounded decay (safe_gate), beta in (0, 2).
    "kda_safe_gate": lambda **kw: _config("kda", dict(num_heads=4, head_dim=16, expand_v=1.0, safe_gate=True,
                                                    lower_bound=-5.0, allow_neg_eigval=True), **kw),
}

# Value heads kept in layers 0, 1, 2, by number of value heads.
PLANS = {
    6: {
        "uneven": {0: [0, 1, 2, 4], 1: [1, 5], 2: [0, 1, 2, 3, 4, 5]},  # layer 0: groups of 2, 1, 1
        "single-and-odd": {0: [3], 1: [0, 2, 3, 4, 5], 2: [1, 2, 4]},
        "even-uniform": {0: [0, 1, 4, 5], 1: [2, 3, 4, 5], 2: [0, 1, 2, 3]},  # stock grouping in every layer
    },
    4: {
        "uneven": {0: [0, 2, 3], 1: [1], 2: [0, 1, 2, 3]},
        "single-and-odd": {0: [3], 1: [0, 2], 2: [1, 2, 3]},
        "even-uniform": {0: [0, 1], 1: [2, 3], 2: [1, 3]},
    },
}


def plans_for(config_name: str) -> dict[str, dict[int, list[int]]]:
    config = CONFIGS[config_name]()
    heads = getattr(config, "num_v_heads", None) or config.num_heads
    return PLANS[heads]


def tiny_fla_model(name: str, seed: int = 0, **fields) -> torch.nn.Module:
    """A float32 model in eval mode with weights strong enough that every head matters."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[name](**fields), dtype=torch.float32).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.1)
    return spread_constant_vectors(model)


def save_with_tokenizer(name: str, folder: Path) -> Path:
    """A tiny model with the fixture's tokenizer (vocabulary 8192), saved to ``folder`` as a source checkpoint."""
    tiny_fla_model(name, vocab_size=FIXTURE_VOCAB).save_pretrained(folder)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(FIXTURE / file, folder / file)
    return folder


def input_ids(seed: int = 0, vocab_size: int = 96) -> torch.Tensor:
    """[2, 150]: two full 64-token chunks and a partial one."""
    return torch.randint(3, vocab_size, (2, 150), generator=torch.Generator().manual_seed(seed))


# Checks shared by the fla family test files (one file per family, parametrised over its tiny configs).

TOLERANCE = 2e-4  # float32 rounds differently for different head counts; the float64 tests pin 1e-10
GLA_RELOAD_TOLERANCE = 1e-3
"""The same GLA folder's logits in this process and in a fresh one: the PyTorch chunked GLA (exp of cumulative
log-gates, as fla's naive form) amplifies float32 rounding that differs between processes; 4.6e-4 was seen on
logits of magnitude 3.8 in about one full run in four (2026-12-02), 0 in the rest. Wrong weights differ by O(1).
Removal against masking, in one process, keeps TOLERANCE."""
EVAL_TEXT = Path(compressor.__file__).parent / "data" / "python-docs-eval.txt"


def check_removal_equals_masking(config_name: str, plan_name: str) -> None:
    """Pruned logits equal the masked model's (float32, <= 1e-4), and the removed heads changed the logits."""
    from tiny_models import masked_copy

    from compressor.families import family_for
    from compressor.layers import PruningPlan, linear_layers
    from compressor.slicing import slim

    model = tiny_fla_model(config_name)
    kept = plans_for(config_name)[plan_name]
    ids = input_ids()
    with torch.no_grad():
        unmasked = model(ids).logits
        masked = masked_copy(model, kept)(ids).logits
        slim(model, family_for(model.config), PruningPlan(kept=kept))
        pruned = model(ids).logits
    assert (pruned - masked).abs().max().item() <= TOLERANCE
    assert (pruned - unmasked).abs().max().item() > 1e-2, "the removed heads must matter for this check to mean much"
    for index, mixer in linear_layers(model, family_for(model.config)).items():
        assert mixer.num_v_heads == len(kept[index])
        assert mixer.o_proj.weight.shape[1] == len(kept[index]) * mixer.head_v_dim


def check_reload_without_compressor(config_names: list[str], tmp_path: Path) -> None:
    """Folders of uneven and even-uniform plans load in a fresh process where compressor cannot be imported, with
    the same logits, and generate with their cache; the even-uniform config is a stock one (no per-layer heads)."""
    import json

    from fresh_process import reloaded_logits

    from compressor.export import write_model
    from compressor.families import family_for
    from compressor.layers import PruningPlan
    from compressor.slicing import slim

    ids = input_ids(3)
    expected = {}
    for config_name in config_names:
        for plan_name in ("uneven", "even-uniform"):
            model = tiny_fla_model(config_name)
            family = family_for(model.config)
            slim(model, family, PruningPlan(kept=plans_for(config_name)[plan_name]))
            folder = tmp_path / f"{config_name}-{plan_name}"
            write_model(model, family, folder)
            with torch.no_grad():
                expected[folder.name] = model(ids).logits
            saved = json.loads((folder / "config.json").read_text())
            assert ("per_layer_config" in saved) == (plan_name == "uneven"), saved
            stock = stock_base(type(model))
            assert saved["architectures"] == [type(model).__name__ if plan_name == "uneven" else stock.__name__]
    reloaded = reloaded_logits(sorted(expected), ids, tmp_path, checks="""
        assert not any(info.values()), info
        assert type(model).__name__.startswith("Pruned"), type(model)
        """)
    for name, logits in expected.items():
        difference = (reloaded[name] - logits).abs().max().item()
        assert difference <= (GLA_RELOAD_TOLERANCE if name.startswith("gla") else TOLERANCE), (name, difference)


def check_cli_prune(config_name: str, tmp_path: Path) -> None:
    """``compress prune`` end to end on a tiny random checkpoint: state reduction reached, record, config and
    verification."""
    import json
    import math

    from click.testing import CliRunner
    from transformers import AutoConfig

    from compressor.cli import main

    source = save_with_tokenizer(config_name, tmp_path / "source")
    out = tmp_path / "pruned"
    args = ["prune", source, "--out", out, "--state-reduction", "0.3", "--method", "norm", "--remove", "low",
            "--samples", "2", "--seq-len", "256", "--eval", EVAL_TEXT, "--eval-samples", "2", "--eval-seq-len", "256"]
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    assert result.exit_code == 0, result.output + repr(result.exception)
    record = json.loads((out / "compression.json").read_text())
    assert record["family"] == CONFIGS[config_name]().model_type
    assert record["state_bytes_after"] <= 0.7 * record["state_bytes_before"]
    assert record["params_after"] < record["params_before"]
    assert record["verify"]["passed"] and record["verify"]["max_abs_logit_diff"] <= TOLERANCE
    assert math.isfinite(record["eval"]["perplexity_before"]) and math.isfinite(record["eval"]["perplexity_after"])
    config = AutoConfig.from_pretrained(out)
    assert set(config.auto_map) == {"AutoConfig", "AutoModelForCausalLM"}
    assert config.model_type == f"{record['family']}_per_layer"  # its own type: fla's classes cannot read it
    for layer, entry in record["layers"].items():
        layer_config = config.per_layer_config[int(layer)]
        assert (getattr(layer_config, "num_v_heads", None) or layer_config.num_heads) == len(entry["kept_heads"])
    assert (out / "README.md").is_file() and (out / "fla_layers.py").is_file()
