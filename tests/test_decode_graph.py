"""Decode steps replayed from recorded CUDA graphs give the eager steps' tokens and logits (CUDA with fla only),
and are never taken where a graph could go stale."""

from __future__ import annotations

import gc

import pytest
import torch
from tiny_models import PLANS, masked_copy, qwen3_next_config

from compressor.families import family_for
from compressor.layers import PruningPlan, linear_layers
from compressor.slicing import slim

cuda_with_fla = pytest.mark.skipif(not torch.cuda.is_available(), reason="decode graphs are recorded on CUDA only")


def pruned_model():
    """A tiny dense Qwen3-Next (head sizes 16 and 32) with value heads removed unevenly, and its masked source."""
    from transformers import AutoModelForCausalLM

    config = qwen3_next_config(moe=False)
    config.linear_key_head_dim, config.linear_value_head_dim = 16, 32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.1)
    kept = PLANS["uneven"]
    masked = masked_copy(model, kept)
    slim(model, family_for(model.config), PruningPlan(kept=kept))
    return model, masked


def generate(model, prompt, mask=None):
    with torch.no_grad():
        return model.generate(prompt, attention_mask=mask, max_new_tokens=10, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0)


@cuda_with_fla
def test_graphed_decode_steps_equal_eager_steps_and_the_masked_source(caplog):
    pytest.importorskip("fla")
    model, masked = pruned_model()
    model, masked = model.cuda(), masked.cuda()
    mixers = list(linear_layers(model, family_for(model.config)).values())
    prompt = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(1)).cuda()
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0  # the second row left-padded
    for mixer in mixers:
        mixer.use_decode_graph = False
    eager = generate(model, prompt, mask)
    reference = generate(masked, prompt, mask)
    for mixer in mixers:
        mixer.use_decode_graph = True
    counts = []
    for _ in range(2):  # a new cache each time: the graphs are recorded again, unless it lies where the last one did
        graphed = generate(model, prompt, mask)
        assert torch.equal(graphed.sequences, eager.sequences) and torch.equal(graphed.sequences, reference.sequences)
        for a, b, c in zip(graphed.logits, eager.logits, reference.logits):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)
        counts.append({(m._decode_graph.captures, m._decode_graph.replays) for m in mixers})
    # 9 decode steps: the first eager (a new cache), the second recorded, all but the first replayed; the second
    # generate replays all 9 from the first's graphs if its cache took the same memory
    assert counts[0] == {(1, 8)} and counts[1] in ({(2, 16)}, {(1, 17)})
    for mixer in [*mixers, *linear_layers(masked, family_for(masked.config)).values()]:  # every graph gone
        mixer.set_value_to_key(mixer.value_to_key)
    gc.collect()
    again = generate(model, prompt, mask)
    assert torch.equal(again.sequences, eager.sequences)
    assert {(m._decode_graph.captures, m._decode_graph.replays) for m in mixers} == {(1, 8)}
    assert not [r for r in caplog.records if r.name.endswith("decode_graph")]  # no layer fell back to eager steps
    torch.randn(4, device="cuda")  # the random generator is not left inside a capture


@cuda_with_fla
def test_no_graph_where_hooks_may_move_weights():
    pytest.importorskip("fla")
    from accelerate.hooks import ModelHook, add_hook_to_module

    model, _ = pruned_model()
    model = model.cuda()
    mixers = list(linear_layers(model, family_for(model.config)).values())
    prompt = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(2)).cuda()
    add_hook_to_module(mixers[0].in_proj_qkvz, ModelHook())
    generate(model, prompt)
    assert [m._decode_graph.captures for m in mixers] == [0, 1, 1]
