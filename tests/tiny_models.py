"""Random-initialised tiny models of every supported family, for tests."""

from __future__ import annotations

import copy

import torch
from transformers import Qwen3_5TextConfig, Qwen3NextConfig

import compressor

compressor.register()  # the shipped classes, for stock model types too
from compressor.families import family_for
from compressor.layers import PruningPlan, linear_layers
from compressor.slicing import slim

LAYER_TYPES = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=len(LAYER_TYPES),
    layer_types=LAYER_TYPES,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    linear_num_key_heads=3,
    linear_num_value_heads=6,
    linear_key_head_dim=8,
    linear_value_head_dim=12,
    linear_conv_kernel_dim=4,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def qwen3_5_config() -> Qwen3_5TextConfig:
    return Qwen3_5TextConfig(**COMMON)


def qwen3_next_config(moe: bool = True) -> Qwen3NextConfig:
    return Qwen3NextConfig(
        **COMMON,
        num_experts=4 if moe else 0,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        decoder_sparse_step=1,
        mlp_only_layers=[] if moe else list(range(len(LAYER_TYPES))),
    )


CONFIGS = {
    "qwen3_5": qwen3_5_config,
    "qwen3_next_moe": lambda: qwen3_next_config(moe=True),
    "qwen3_next_dense": lambda: qwen3_next_config(moe=False),
}


def spread_constant_vectors(model: torch.nn.Module) -> torch.nn.Module:
    """Add N(0, 0.1) noise to every vector parameter whose entries the initialisation left all equal (zero biases,
    Qwen's ``dt_bias`` of ones, norm weights): a per-head vector taken from the wrong heads or channels, or a weight
    the shipped forward forgets, must change the logits, or no test would see it."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1 and parameter.numel() > 1 and parameter.std() == 0:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def tiny_model(name: str, seed: int = 0, vocab_size: int | None = None, **fields) -> torch.nn.Module:
    """A float32 model in eval mode whose decays and gates are spread enough to make every head matter
    (``vocab_size``: instead of 96, e.g. the fixture tokenizer's 8,192 for a model saved with it; ``fields``: other
    config fields to override)."""
    from transformers import AutoModelForCausalLM

    config = CONFIGS[name]()
    if vocab_size is not None:
        config.vocab_size = vocab_size
    for field, value in fields.items():
        setattr(config, field, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # stronger weights than the tiny init, so differences show
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.1)
    return spread_constant_vectors(model)


# Linear layers 0, 2, 3; 6 value heads over 3 key heads (value head j reads key head j // 2).
PLANS = {
    "uneven": {0: [0, 1, 2, 4], 2: [1, 5], 3: [0, 1, 2, 3, 4, 5]},  # layer 0: groups of 2, 1, 1
    "single-and-odd": {0: [3], 2: [0, 2, 3, 4, 5], 3: [1, 2, 4]},
    "even-uniform": {0: [0, 1, 4, 5], 2: [2, 3, 4, 5], 3: [0, 1, 2, 3]},  # stock grouping in every layer
}


def in_float64(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in float64, its MoE experts (if any) running their loop: torch's grouped matrix product,
    transformers' default for experts, takes no float64."""
    if model._can_set_experts_implementation():
        model.set_experts_implementation("eager")
    return model.double()


def masked_copy(model: torch.nn.Module, kept: dict[int, list[int]]) -> torch.nn.Module:
    """The model with the removed heads' output-projection columns set to zero."""
    masked = copy.deepcopy(model)
    family = family_for(masked.config)
    for index, mixer in linear_layers(masked, family).items():
        width = mixer.head_v_dim
        with torch.no_grad():
            for head in set(range(mixer.num_v_heads)) - set(kept[index]):
                mixer.out_proj.weight[:, head * width : (head + 1) * width] = 0
    return masked


def check_cached_generation(model: torch.nn.Module, kept: dict[int, list[int]], prompt: torch.Tensor) -> None:
    """After slicing ``kept`` out of ``model`` (in place), prefill of ``prompt`` [B, T] then token-by-token decode
    (conv and recurrent caches) gives the masked model's logits and those of one uncached pass over the generated
    text (float32, <= 1e-4)."""
    masked = masked_copy(model, kept)
    slim(model, family_for(model.config), PruningPlan(kept=kept))
    settings = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
                    pad_token_id=0)
    with torch.no_grad():
        ours = model.generate(prompt, **settings)
        reference = masked.generate(prompt, **settings)
        full = model(ours.sequences).logits
    assert torch.equal(ours.sequences, reference.sequences)
    for step, (a, b) in enumerate(zip(ours.logits, reference.logits)):
        assert (a - b).abs().max().item() <= 1e-4
        assert (a - full[:, prompt.shape[1] - 1 + step]).abs().max().item() <= 1e-4


def recurrence_inputs(model: torch.nn.Module, mixer: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """One forward of ``model`` on ``ids`` without autograd: (``mixer``'s input hidden [B, T, D], the gates its
    recurrence received: every positional argument after q, k and v)."""
    seen = {}
    hook = mixer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(hidden=kwargs.get("hidden_states", args[0] if args else None)),
        with_kwargs=True)
    recurrence = mixer.recurrence

    def spy(q, k, v, *gates, **options):
        seen["gates"] = gates
        return recurrence(q, k, v, *gates, **options)

    mixer.recurrence = spy
    try:
        with torch.no_grad():
            model(ids)
    finally:
        hook.remove()
        del mixer.recurrence
    return seen["hidden"], seen["gates"]
