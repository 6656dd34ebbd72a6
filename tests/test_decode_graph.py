"""Decode steps replayed from recorded CUDA graphs give the eager steps' tokens and logits (CUDA with fla only),
and are never taken where a graph could go stale."""

from __future__ import annotations

import copy
import gc
import pickle

import pytest
import torch
from tiny_hybrids import tiny_hybrid
from tiny_models import PLANS, masked_copy, qwen3_next_config

from compressor.families import family_for
from compressor.layers import PruningPlan, linear_layers
from compressor.modeling.decode_graph import DecodeGraph
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


KIMI_KEPT = {0: [0, 2, 5], 2: [1, 4], 3: [0, 1, 2, 3, 5]}
"""Kept KDA heads of the tiny Kimi Linear (6 heads in layers 0, 2 and 3)."""


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
    graphed = generate(model, prompt, mask)
    assert torch.equal(graphed.sequences, eager.sequences) and torch.equal(graphed.sequences, reference.sequences)
    for a, b, c in zip(graphed.logits, eager.logits, reference.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)
    # 9 decode steps: the first eager (a new cache), the second recorded, all but the first replayed
    assert {(m._decode_graph.captures, m._decode_graph.replays) for m in mixers} == {(1, 8)}
    del graphed  # its cache freed: the next one may take its memory, and the graphs then replay from its first step
    gc.collect()
    other = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(3)).cuda()
    for mixer in mixers:
        mixer.use_decode_graph = False
    eager_other = generate(model, other, mask)
    for mixer in mixers:
        mixer.use_decode_graph = True
    graphed_other = generate(model, other, mask)
    assert torch.equal(graphed_other.sequences, eager_other.sequences)
    for a, b in zip(graphed_other.logits, eager_other.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert {(m._decode_graph.captures, m._decode_graph.replays) for m in mixers} in ({(2, 16)}, {(1, 17)})
    for mixer in [*mixers, *linear_layers(masked, family_for(masked.config)).values()]:  # every graph gone
        mixer.set_value_to_key(mixer.value_to_key)
    gc.collect()
    again = generate(model, prompt, mask)
    assert torch.equal(again.sequences, eager.sequences)
    assert {(m._decode_graph.captures, m._decode_graph.replays) for m in mixers} == {(1, 8)}  # counts start anew
    assert not [r for r in caplog.records if r.name.endswith("decode_graph")]  # no layer fell back to eager steps
    torch.randn(4, device="cuda")  # the random generator is not left inside a capture


@cuda_with_fla
def test_kimi_linear_decode_steps_replayed_equal_eager_steps():
    """Kimi Linear's KDA layers replay their decode steps too (the MLA and MoE layers stay eager)."""
    pytest.importorskip("fla")
    model = tiny_hybrid("kimi_linear")
    slim(model, family_for(model.config), PruningPlan(kept=KIMI_KEPT))
    model = model.cuda()
    mixers = list(linear_layers(model, family_for(model.config)).values())
    prompt = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(1)).cuda()
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0
    for mixer in mixers:
        mixer.use_decode_graph = False
    eager = generate(model, prompt, mask)
    for mixer in mixers:
        mixer.use_decode_graph = True
    graphed = generate(model, prompt, mask)
    assert torch.equal(graphed.sequences, eager.sequences)
    for a, b in zip(graphed.logits, eager.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert {(m._decode_graph.captures, m._decode_graph.replays) for m in mixers} == {(1, 8)}


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


@cuda_with_fla
def test_a_replay_reads_the_states_and_weights_as_they_are_now():
    """A graph replays on the tensors at its key's addresses: new contents there (a new cache in the old one's
    memory, weights changed in place) are read, not the ones seen when it was recorded."""
    weight, state = torch.randn(8, 8, device="cuda"), torch.zeros(3, 1, 8, device="cuda")

    def step(hidden, state):
        state.mul_(0.5).add_(hidden @ weight)
        return torch.tanh(state) * 2

    graph = DecodeGraph()
    generator = torch.Generator().manual_seed(5)
    for turn in range(6):
        hidden = torch.randn(3, 1, 8, generator=generator).cuda()
        if turn == 4:
            weight.mul_(-2)
            state.fill_(1.0)
        expected_state = state.clone().mul_(0.5).add_(hidden @ weight)
        out = graph(step, hidden, (state,), (weight,))
        torch.testing.assert_close(out, torch.tanh(expected_state) * 2)
        torch.testing.assert_close(state, expected_state)
    assert (graph.captures, graph.replays) == (1, 5)


def test_copies_of_a_decode_graph_start_empty():
    graph = DecodeGraph()
    graph.key, graph.captures, graph.failed = ("anything",), 3, True
    for copied in (copy.deepcopy(graph), pickle.loads(pickle.dumps(graph))):
        assert (copied.key, copied.graph, copied.captures, copied.failed) == (None, None, 0, False)


def test_layers_with_hooked_or_adapted_submodules_are_not_replayed():
    """During a real ``generate``, a plain layer's submodules may be replayed; a hook or a peft adapter on one of
    them (whose Python-side switches a replay would skip) rules the layer out."""
    model, _ = pruned_model()
    mixers = list(linear_layers(model, family_for(model.config)).values())
    seen = []
    for mixer in mixers:
        mixer.mix = lambda *args, mixer=mixer, mix=mixer.mix, **kwargs: seen.append(mixer.submodules_replayable()) \
            or mix(*args, **kwargs)
    prompt = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(2))
    generate(model, prompt)
    assert seen and all(seen)
    handle = mixers[0].out_proj.register_forward_hook(lambda *args: None)
    assert not mixers[0].submodules_replayable()
    handle.remove()
    assert mixers[0].submodules_replayable()
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(target_modules=["in_proj_qkvz"], r=2), mixers[1])
    assert not mixers[1].submodules_replayable() and mixers[2].submodules_replayable()


def test_a_decode_step_is_graphable_only_where_a_replay_would_compute_the_same(monkeypatch):
    """Every condition of ``graphable`` rules a replay out on its own (checked on CPU: the device checks are stood
    in for, the others are the real ones)."""
    pytest.importorskip("fla")
    from types import SimpleNamespace

    from compressor.modeling import gated_deltanet

    model, _ = pruned_model()
    mixer = next(iter(linear_layers(model, family_for(model.config)).values()))
    monkeypatch.setattr(gated_deltanet, "can_step_in_place", lambda state: state is not None)
    capturing = {"now": False}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing["now"])
    on_gpu, state = SimpleNamespace(is_cuda=True), torch.zeros(1)
    assert mixer.graphable(on_gpu, state)
    assert not mixer.graphable(SimpleNamespace(is_cuda=False), state)
    assert not mixer.graphable(on_gpu, None)  # no state the step can update in place
    capturing["now"] = True
    assert not mixer.graphable(on_gpu, state)
    capturing["now"] = False
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type: device_type == "cuda")
    assert not mixer.graphable(on_gpu, state)
    monkeypatch.undo()
    monkeypatch.setattr(gated_deltanet, "can_step_in_place", lambda state: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    mixer.recurrence = lambda *args, **kwargs: None  # calibration's swap
    assert not mixer.graphable(on_gpu, state)
    del mixer.recurrence
    assert mixer.graphable(on_gpu, state)
    mixer.use_decode_graph = False
    assert not mixer.graphable(on_gpu, state)


def test_a_kimi_linear_decode_step_is_graphable_where_its_kda_step_writes_in_place(monkeypatch):
    pytest.importorskip("fla")
    from types import SimpleNamespace

    from compressor.modeling import kda, modeling_kimi_linear

    model = tiny_hybrid("kimi_linear")
    slim(model, family_for(model.config), PruningPlan(kept=KIMI_KEPT))
    mixer = next(iter(linear_layers(model, family_for(model.config)).values()))
    monkeypatch.setattr(modeling_kimi_linear, "can_step_kda_in_place", lambda state: state is not None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # no CUDA here
    on_gpu, state = SimpleNamespace(is_cuda=True), torch.zeros(1)
    assert mixer.graphable(on_gpu, state)
    assert not mixer.graphable(on_gpu, None)
    mixer.recurrence = lambda *args, **kwargs: None  # calibration's swap
    assert not mixer.graphable(on_gpu, state)
    del mixer.recurrence
    monkeypatch.setattr(kda, "HAS_FLA", False)  # the recurrences kept off fla (healing)
    assert not mixer.graphable(on_gpu, state)
