"""Assisted (speculative) generation with the shipped code as the main model or as the assistant gives the tokens
of plain greedy decoding: the mixers hand transformers' cache the states it records for a rollback (``crop``)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_hybrids import tiny_hybrid
from tiny_models import PLANS, qwen3_next_config
from transformers import AutoModelForCausalLM, DynamicCache

from compressor.families import family_for
from compressor.layers import PruningPlan, linear_layers
from compressor.slicing import slim

pytestmark = pytest.mark.skipif(not hasattr(DynamicCache, "get_recurrent_states_to_keep"),
                                reason="transformers < 5.25 records no recurrent states for a rollback")

KEPT = {"qwen3_next": PLANS["uneven"], "kimi_linear": {0: [0, 2, 5], 2: [1, 4], 3: [0, 1, 2, 3, 5]}}
SETTINGS = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)


def pruned(name: str, fla_head_sizes: bool = False) -> torch.nn.Module:
    """A tiny model of the shipped classes with heads removed unevenly (float32, CPU); ``fla_head_sizes``: heads of
    16 (Kimi Linear) or key and value heads of 16 and 32 (Qwen3-Next), sizes fla's kernels take."""
    if name == "kimi_linear":
        model = tiny_hybrid(name, **({"linear_head_dim": 16} if fla_head_sizes else {}))
    else:
        config = qwen3_next_config(moe=False)
        if fla_head_sizes:
            config.linear_key_head_dim, config.linear_value_head_dim = 16, 32
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.dim() >= 2:
                    parameter.normal_(0.0, 0.1)
    slim(model, family_for(model.config), PruningPlan(kept=KEPT[name]))
    return model


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """A copy with noise on its matrices: an assistant whose guesses are sometimes rejected."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in other.parameters():
            if parameter.dim() >= 2:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator).to(parameter.device))
    return other


def writing_over_the_initial_state(recurrence):
    """``recurrence`` whose one-token steps write the new state over the initial one, as fla's step does on CUDA."""

    def step(q, k, v, g, beta, initial_state=None, output_final_state=False, **options):
        out, final = recurrence(q, k, v, g, beta, initial_state=initial_state, output_final_state=output_final_state,
                                **options)
        if q.shape[1] == 1 and initial_state is not None and final is not None:
            return out, initial_state.copy_(final)
        return out, final

    return step


@pytest.mark.parametrize("in_place", [False, True], ids=["new-state", "state-in-place"])
@pytest.mark.parametrize("name", ["qwen3_next", "kimi_linear"])
def test_assisted_generation_gives_the_greedy_tokens(name, in_place):
    model = pruned(name)
    assistant = perturbed(model)
    if in_place:
        for mixer in [*linear_layers(model, family_for(model.config)).values(),
                      *linear_layers(assistant, family_for(assistant.config)).values()]:
            mixer.recurrence = writing_over_the_initial_state(mixer.recurrence)
    prompt = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model.generate(prompt, **SETTINGS)
        assert torch.equal(model.generate(prompt, assistant_model=assistant, **SETTINGS), plain)
        assert torch.equal(assistant.generate(prompt, assistant_model=model, **SETTINGS),
                           assistant.generate(prompt, **SETTINGS))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's decode steps and the decode graphs run on CUDA only")
@pytest.mark.parametrize("name", ["qwen3_next", "kimi_linear"])
def test_assisted_generation_on_cuda_gives_the_greedy_tokens(name):
    """On CUDA fla's decode step writes over the cache's state, plain decoding replays CUDA graphs, and a rollback's
    first token (no state yet) takes fla's chunked path on one-token slices of head-major q and k."""
    pytest.importorskip("fla")
    model = pruned(name, fla_head_sizes=True).cuda()
    assistant = perturbed(model)
    prompt = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        plain = model.generate(prompt, **SETTINGS)
        assert torch.equal(model.generate(prompt, assistant_model=assistant, **SETTINGS), plain)
        assert torch.equal(assistant.generate(prompt, assistant_model=model, **SETTINGS),
                           assistant.generate(prompt, **SETTINGS))
    assert any(mixer._decode_graph.replays for mixer in linear_layers(model, family_for(model.config)).values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's kernels run on CUDA only")
@pytest.mark.parametrize("name", ["qwen3_next", "kimi_linear"])
def test_a_forward_recording_every_state_on_cuda_equals_a_plain_one(name):
    """A cache that records the state after each of the last N ≥ T tokens runs every token as a step, the first
    without a state through fla's chunked path: the logits equal a forward without a cache."""
    pytest.importorskip("fla")
    model = pruned(name, fla_head_sizes=True).cuda()
    ids = torch.randint(3, 96, (1, 21), generator=torch.Generator().manual_seed(2)).cuda()
    cache = DynamicCache(config=model.config)
    cache.activate_past_recording(recurrent_states_to_keep=ids.shape[1])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, cache=cache, use_cache=True).logits, model(ids).logits,
                                   rtol=0, atol=1e-2)  # float32: fla's chunked and recurrent kernels differ slightly
