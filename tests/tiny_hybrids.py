"""Random-initialised tiny transformers hybrids (Qwen3.5-MoE, OLMo-Hybrid, Kimi Linear) and the checks that every
family must pass: removing heads equals masking them, cached generation, a fresh-process reload without
compressor, and ``compress prune`` end to end on a saved folder.

The models use the fixture's tokenizer vocabulary (8192 tokens), so a saved tiny model plus the fixture's
tokenizer files is a complete model folder for the command line.
"""

from __future__ import annotations

import inspect
import json
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from textwrap import dedent

import torch
from click.testing import CliRunner
from fresh_process import FLA_BLOCKER, STOCK_DISPATCH, reloaded_logits
from tiny_models import COMMON, in_float64, masked_copy, spread_constant_vectors
from transformers import AutoConfig, AutoModelForCausalLM, OlmoHybridConfig, Qwen3_5MoeTextConfig

import compressor
from compressor.calibration import collect_state_statistics, states_handed_to

compressor.register()
from compressor.cli import main
from compressor.export import write_model
from compressor.families import family_for
from compressor.layers import PruningPlan, linear_layers
from compressor.slicing import slim, stock_base

TOLERANCE = 2e-4  # float32 rounds differently for different head counts; the float64 tests pin 1e-10
FIXTURE = Path(__file__).parent / "fixtures" / "qwen35-tiny-6m"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
EVAL_TEXT = Path(compressor.__file__).parent / "data" / "python-docs-eval.txt"
VOCAB = 8192
HYBRID = {**COMMON, "vocab_size": VOCAB}  # layers 0, 2, 3 linear; 6 value heads over 3 key heads (d_k 8, d_v 12)


def qwen3_5_moe_config() -> Qwen3_5MoeTextConfig:
    fields = {k: v for k, v in HYBRID.items() if k != "intermediate_size"}  # MoE only: no dense MLP size
    return Qwen3_5MoeTextConfig(**fields, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                shared_expert_intermediate_size=32)


def olmo_hybrid_config() -> OlmoHybridConfig:
    fields = {k: v for k, v in HYBRID.items() if k != "head_dim"}
    return OlmoHybridConfig(**fields, linear_allow_neg_eigval=True)


def kimi_linear_config(**fields):
    """KDA in layers 0, 2, 3 (6 heads of d 8), MLA in layer 1; a dense MLP in layer 0, MoE after; ``fields``
    override any of these. Built by the config class that ``import compressor`` registers for "kimi_linear", as
    loading a folder would."""
    return AutoConfig.for_model("kimi_linear", **{
        **dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
               num_hidden_layers=len(HYBRID["layer_types"]), layer_types=HYBRID["layer_types"],
               num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16, q_lora_rank=None,
               qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
               num_experts=4, num_experts_per_token=2, num_shared_experts=1, num_expert_group=1, topk_group=1,
               linear_num_heads=6, linear_head_dim=8, linear_conv_kernel_dim=4,
               pad_token_id=0, bos_token_id=1, eos_token_id=2),
        **fields,
    })


CONFIGS = {
    "qwen3_5_moe": qwen3_5_moe_config,
    "olmo_hybrid": olmo_hybrid_config,
    "kimi_linear": kimi_linear_config,
}


def tiny_hybrid(name: str, seed: int = 0, **fields) -> torch.nn.Module:
    """A float32 model in eval mode whose weights (std 0.05) make every head move the logits by more than 1;
    ``fields``: config fields to override (Kimi Linear's only).

    Stronger weights (std 0.1) drive the MoE hybrids' residual streams into a regime where float32 rounding of
    the reordered matrix products alone reaches 1e-4 on a few tokens (float64 stays exact).
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[name](**fields), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2 and not name.endswith("A_log"):  # Kimi's A_log is [1, 1, H, 1]: keep its spread
                parameter.normal_(0.0, 0.05)
    return spread_constant_vectors(model)


def input_ids(seed: int = 0, length: int = 150) -> torch.Tensor:
    """[2, length] random token ids; 150 tokens are two full 64-token chunks and a partial one."""
    return torch.randint(3, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def check_removal_equals_masking(model: torch.nn.Module, kept: dict[int, list[int]]) -> None:
    """Slicing ``kept`` out of ``model`` (in place) gives the logits of the masked model, and the removed heads
    changed the logits (so a wrong slice could not pass)."""
    ids = input_ids()
    family = family_for(model.config)
    with torch.no_grad():
        unmasked = model(ids).logits
        masked = masked_copy(model, kept)(ids).logits
        slim(model, family, PruningPlan(kept=kept))
        pruned = model(ids).logits
    assert (pruned - masked).abs().max().item() <= TOLERANCE
    assert (pruned - unmasked).abs().max().item() > 1e-2, "the removed heads must matter, or this check means nothing"
    for index, mixer in linear_layers(model, family).items():
        assert mixer.num_v_heads == len(kept[index])
        assert mixer.out_proj.weight.shape[1] == len(kept[index]) * mixer.head_v_dim


@contextmanager
def stock_torch_functions(module):
    """Inside, the stock modeling ``module``'s kernel functions (wrapped to call fla, which crashes on CPU
    tensors) are their own PyTorch references."""
    wrapped = {name: f for name, f in vars(module).items() if inspect.isfunction(f) and hasattr(f, "__wrapped__")}
    try:
        for name, function in wrapped.items():
            setattr(module, name, inspect.unwrap(function))
        yield
    finally:
        for name, function in wrapped.items():
            setattr(module, name, function)


def check_matches_stock(model: torch.nn.Module, ids: torch.Tensor | None = None) -> None:
    """The shipped class, unpruned, gives the stock transformers class's logits (on its PyTorch path) for ``ids``
    (default: ``input_ids(4)``): a slip in the shipped forward that removal and masking share (a wrong gate, norm or
    scale) shows here."""
    stock_class = stock_base(type(model))
    stock = stock_class(model.config).to(model.dtype).eval()
    stock.load_state_dict(model.state_dict())
    ids = input_ids(4) if ids is None else ids
    with torch.no_grad(), stock_torch_functions(sys.modules[stock_class.__module__]):
        assert (model(ids).logits - stock(ids).logits).abs().max().item() <= TOLERANCE


def check_calibration_states(model: torch.nn.Module) -> None:
    """Every prunable mixer hands its sink the states at every chunk boundary [B, H_v, N, d_k, d_v], the last
    one equal to the recurrent state the cache keeps; the statistics cover exactly those layers and heads."""
    family = family_for(model.config)
    mixers = linear_layers(model, family)
    seen = {}
    with states_handed_to(seen.__setitem__, mixers), torch.no_grad():
        cache = model(input_ids(6), use_cache=True).past_key_values
    assert sorted(seen) == sorted(mixers)
    for layer, mixer in mixers.items():
        assert seen[layer].shape == (2, mixer.num_v_heads, 3, mixer.head_k_dim, mixer.head_v_dim)
        final = cache.get_recurrent_state(layer, state_idx=0)
        assert (seen[layer][:, :, -1] - final).abs().max().item() <= 1e-5
    stats = collect_state_statistics(model, family, input_ids(7, 128), batch_size=2, progress=False)
    assert stats.layers == sorted(mixers) and stats.heads == [mixers[i].num_v_heads for i in stats.layers]
    ranks = stats.mean["threshold_rank"]
    assert ranks.shape[0] == 2 and (ranks > 0).all() and (ranks <= 8).all()  # d_k = 8 in every tiny family


def check_exact_in_float64(model: torch.nn.Module, kept: dict[int, list[int]], ids: torch.Tensor | None = None) -> None:
    """In float64 the pruned and masked models agree to rounding (1e-10) on ``ids`` (default: ``input_ids(1)``)."""
    model = in_float64(model)
    ids = input_ids(1) if ids is None else ids
    with torch.no_grad():
        masked = masked_copy(model, kept)(ids).logits
        slim(model, family_for(model.config), PruningPlan(kept=kept))
        assert (model(ids).logits - masked).abs().max().item() <= 1e-10


def check_fresh_reload(models: dict[str, torch.nn.Module], tmp_path: Path) -> None:
    """Each pruned model, written by ``write_model``, loads in a fresh process where neither compressor nor fla can
    be imported, gives the same logits, and generates with its cache."""
    ids = input_ids(3)
    expected = {}
    for name, model in models.items():
        write_model(model, family_for(model.config), tmp_path / name, max_shard_size="500KB")
        with torch.no_grad():
            expected[name] = model(ids).logits
    reloaded = reloaded_logits(sorted(expected), ids, tmp_path, checks=dedent("""
        assert type(model).__name__.startswith("Pruned"), type(model)
        """) + STOCK_DISPATCH, prelude=FLA_BLOCKER)
    for name, logits in expected.items():
        assert (reloaded[name] - logits).abs().max().item() <= TOLERANCE, name


def saved_tiny_hybrid(name: str, folder: Path) -> Path:
    """Save a tiny model of ``name`` with the fixture's tokenizer: a complete model folder."""
    tiny_hybrid(name).save_pretrained(folder)
    for file in TOKENIZER_FILES:
        shutil.copyfile(FIXTURE / file, folder / file)
    return folder


def check_prune_end_to_end(name: str, tmp_path: Path, state_reduction: float = 0.4) -> dict:
    """``compress prune`` on a saved tiny model: exit 0, the budget met, per-layer heads in the config, the
    record's kept heads in the weights, verification passed, and the folder reloads with the pruned logits.
    Returns the record."""
    source = saved_tiny_hybrid(name, tmp_path / "source")
    out = tmp_path / "pruned"
    args = ["prune", source, "--out", out, "--state-reduction", state_reduction, "--method", "norm", "--remove", "low",
            "--samples", "2", "--seq-len", "128", "--device", "cpu",
            "--eval", EVAL_TEXT, "--eval-samples", "2", "--eval-seq-len", "128"]
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "compression.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert record["family"] == config["model_type"]
    assert 1 - record["state_bytes_after"] / record["state_bytes_before"] >= state_reduction
    assert record["params_after"] < record["params_before"]
    assert record["verify"]["passed"] and record["verify"]["max_abs_logit_diff"] <= TOLERANCE
    assert record["eval"]["perplexity_after"] > 0
    assert (out / "README.md").is_file() and (out / "tokenizer.json").is_file()

    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    source_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    family = family_for(reloaded.config)
    kept = {int(layer): entry["kept_heads"] for layer, entry in record["layers"].items()}
    for layer, mixer in linear_layers(reloaded, family).items():
        assert mixer.num_v_heads == len(kept[layer])
    ids = input_ids(5)
    with torch.no_grad():
        assert (reloaded(ids).logits - masked_copy(source_model, kept)(ids).logits).abs().max().item() <= TOLERANCE
    return record
