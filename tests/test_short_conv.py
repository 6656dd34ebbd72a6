"""fla's short convolutions written per value head, head-major (``short_conv.py``), and the fla mixers that take
them on a GPU outside autograd (``FlaMixerMixin.qkv_heads``)."""

from __future__ import annotations

import pytest
import torch
from hopper import hopper_loads
from triton_interpreter import run_interpreted

CONVOLUTIONS_INTERPRETED = """
import sys
import torch
sys.path[:0] = ["tests"]
from triton_interpreter import run_fla_chunked_kernels
import fla.modules.causal_conv1d
run_fla_chunked_kernels()
from fla.modules import ShortConvolution
from compressor.modeling.fla_rows import l2_normalised
from compressor.modeling.short_conv import convolved_heads

generator = torch.Generator().manual_seed(0)
# (batch, tokens, key heads, head size, taps, dtype, index, bias, cache, activation): lengths that are not a multiple
# of the token block, one shorter than the taps (the cache's inputs reach the last token), a head size that is not
# a power of two, value heads that repeat, skip and reorder key heads
for batch, length, heads, width, taps, dtype, index, bias, cache, act in (
        (2, 37, 3, 16, 4, torch.float32, [0, 0, 1, 2, 2, 2], True, True, "silu"),
        (1, 70, 2, 24, 4, torch.bfloat16, [1, 0], False, False, "silu"),
        (2, 3, 2, 8, 4, torch.float32, [1, 1], False, True, None),
        (1, 40, 2, 16, 3, torch.bfloat16, [0, 1], True, True, None)):
    channels = heads * width
    convs = [ShortConvolution(channels, taps, bias=bias, activation=act).to(dtype) for _ in "qk"]
    with torch.no_grad():
        for conv in convs:
            conv.weight.normal_(generator=generator)
    xs = [torch.randn(batch, length, channels, generator=generator).to(dtype) for _ in "qk"]
    caches = [torch.randn(batch, channels, taps, generator=generator).to(dtype) if cache else None for _ in "qk"]
    index = torch.tensor(index)
    with torch.no_grad():
        got, states = convolved_heads(xs, [c.weight.squeeze(1) for c in convs], [c.bias for c in convs], caches,
                                      index, width, act is not None, output_final_state=True)
        assert got.shape == (2, batch, len(index), length, width) and got.dtype == dtype and got.is_contiguous()
        for group, (conv, x, cache) in enumerate(zip(convs, xs, caches)):
            expected, new_cache = conv(x, cache=cache, output_final_state=True)
            expected = expected.view(batch, length, heads, width)[:, :, index].transpose(1, 2)
            assert torch.equal(got[group], expected), (length, dtype, group, (got[group] - expected).abs().max())
            assert states[group].is_contiguous() and torch.equal(states[group], new_cache), (length, dtype, group)
        one, one_state = convolved_heads(xs[1:], [convs[1].weight.squeeze(1)], [convs[1].bias], caches[1:], index,
                                         width, act is not None, output_final_state=True)
        assert torch.equal(one[0], got[1]) and torch.equal(one_state[0], states[1])
        normalised, none = convolved_heads(xs, [c.weight.squeeze(1) for c in convs], [c.bias for c in convs], caches,
                                           index, width, act is not None, 1e-6)
        assert none is None
        expected = l2_normalised(got.reshape(-1, width)).view(got.shape)  # fla's l2norm kernel after the convolution
        assert torch.equal(normalised, expected), (length, dtype, (normalised - expected).abs().max())
        if len(index) % heads == 0 and len(index) > heads:  # r value heads per key head, fla's layout for them
            ratio = len(index) // heads
            shared, _ = convolved_heads(xs, [c.weight.squeeze(1) for c in convs], [c.bias for c in convs], caches,
                                        index, width, act is not None, values_per_key=ratio)
            assert shared.shape == (2, batch, heads, length, ratio, width) and shared.is_contiguous()
            as_heads = shared.permute(0, 1, 2, 4, 3, 5).reshape(got.shape)  # head j at [j // r, :, j % r]
            assert torch.equal(as_heads, got), (length, dtype)

x = torch.randn(1, 5, 8, generator=generator)
w, index = torch.zeros(8, 4), torch.tensor([0, 1])
state = torch.randn(1, 8, 4, generator=generator)
with torch.no_grad():  # nothing to convolve: the caches are still written
    _, (kept,) = convolved_heads([x[:, :0]], [w], [None], [state], index, 4, True, output_final_state=True)
    _, (last,) = convolved_heads([x], [w], [None], [None], index[:0], 4, True, output_final_state=True)
assert torch.equal(kept, state) and torch.equal(last, x[:, -4:].transpose(1, 2))
for arguments in (([x, torch.zeros(1, 5, 16)], [w, w], [None, None], [None, None], index, 4),  # shapes differ
                  ([x.transpose(1, 2).contiguous().transpose(1, 2)], [w], [None], [None], index, 4),  # strided
                  ([x], [w[:, :3]], [None], [None], index, 4),  # taps of another shape
                  ([x, x], [w, w], [torch.zeros(8), None], [None, None], index, 4),  # one bias of two
                  ([x], [w], [None], [torch.zeros(1, 8, 3)], index, 4),  # a cache of other taps
                  ([x], [w], [None], [None], index.float(), 4),  # a float index
                  ([x], [w], [None], [None], index, 3)):  # channels not a whole number of heads
    try:
        convolved_heads(*arguments, True)
    except ValueError:
        continue
    raise AssertionError("convolved_heads convolved what it cannot")
print("ok")
"""


def test_convolved_heads_equal_flas_convolution_then_the_heads_gathered():
    """``short_conv``'s kernel run by Triton's interpreter against fla's ``ShortConvolution`` (its Triton kernel,
    also interpreted) and a gather of its output's heads: bit for bit in float32 and bf16, with and without bias,
    cache and silu, 3 and 4 taps, lengths below the taps and across token blocks, value heads repeating, skipping
    and reordering key heads; the new caches written by the same launch equal to fla's; one group as the second of
    two; normalising, equal to fla's l2norm kernel run on the convolution; inputs it cannot read refused. A wrong
    tap, offset, state position or head moves values by O(1)."""
    pytest.importorskip("fla.modules.causal_conv1d")
    run_interpreted(CONVOLUTIONS_INTERPRETED)


MIXERS_INTERPRETED = """
import itertools
import sys
import torch
sys.path[:0] = ["tests"]
from emulated_cuda import cuda_path
from tiny_fla import tiny_fla_model
from tiny_fla import plans_for
from compressor.layers import PruningPlan, linear_layers
from compressor.families import family_for
from compressor.modeling import fla_layers, short_conv
from compressor.modeling.packed_heads import normalised_pair
from compressor.slicing import slim

class Reached(Exception):
    pass


def spy(*arguments, use_qk_l2norm, **options):  # a recurrence: what the forward tells it
    raise Reached(use_qk_l2norm)


calls = []
fla_layers.convolved_heads = lambda *arguments, **options: (calls.append(1)
                                                            or short_conv.convolved_heads(*arguments, **options))
generator = torch.Generator().manual_seed(0)
normalising = {"kda_gva": True, "delta_net_relu_sum": False, "gated_deltanet": True, "gla_conv_relu": False,
               "delta_net": True}
for name in normalising:  # kda_gva: uneven groups
    model = tiny_fla_model(name)
    slim(model, family_for(model.config), PruningPlan(kept=plans_for(name)["uneven"]))
    mixer = linear_layers(model, family_for(model.config))[0]
    hiddens = [torch.randn(2, length, model.config.hidden_size, generator=generator) for length in (37, 3)]
    width = mixer.q_conv1d.kernel_size[0]
    caches = {"conv_state": tuple(torch.randn(2, width, conv.weight.shape[0], generator=generator).transpose(1, 2)
                                  for conv in (mixer.q_conv1d, mixer.k_conv1d, mixer.v_conv1d))}  # any layout
    for hidden, (last_state, use_cache) in itertools.product(hiddens, ((None, False), (None, True), (caches, True))):
        with torch.no_grad(), cuda_path():
            before = len(calls)
            got = mixer.qkv_heads(hidden, last_state, use_cache)
            assert len(calls) == before + 2, name  # queries and keys in one launch, values in another
            mixer.recurrence = type(mixer).recurrence  # as a capture wraps it: not normalised
            unnormalised = mixer.qkv_heads(hidden, last_state, use_cache)
            del mixer.recurrence
            assert len(calls) == before + 4 and unnormalised[4] is False, name
            mixer.heads = type(mixer).heads.__get__(mixer)  # as a mask wraps it: the convolutions and heads apart
            expected = mixer.qkv_heads(hidden, last_state, use_cache)
            del mixer.heads
            assert len(calls) == before + 4 and expected[4] is False, name
            assert got[4] is normalising[name], name
            if got[4]:
                expected = (*normalised_pair(*expected[:2]), *expected[2:])
        for i, (a, b, c) in enumerate(zip(got[:3], expected[:3], unnormalised[:3])):
            assert a.shape == b.shape and torch.equal(a, b), (name, use_cache, (a - b).abs().max())
            assert torch.equal(a, c) == (i == 2 or not got[4]), (name, i)  # only q and k normalised, where they are
        assert got[0].transpose(1, 2).is_contiguous() and got[2].transpose(1, 2).is_contiguous()  # head-major
        for a, b in zip(got[3], expected[3], strict=True):
            assert (a is None) == (b is None) == (not use_cache) and (a is None or torch.equal(a, b)), (name, "cache")
    if name.startswith("gla"):
        continue  # its recurrence normalises nothing
    stock = type(mixer).recurrence
    type(mixer).recurrence = staticmethod(spy)  # the class's own: the convolutions normalise where they may
    told = []
    for wrap in (False, True):
        if wrap:
            mixer.heads = type(mixer).heads.__get__(mixer)
        try:
            with torch.no_grad(), cuda_path():
                mixer(hiddens[0])
        except Reached as reached:
            told.append(reached.args[0])
        mixer.__dict__.pop("heads", None)
    type(mixer).recurrence = stock
    l2 = getattr(mixer, "qk_norm", "l2") == "l2"
    assert told == [l2 and not normalising[name], l2], (name, told)  # never normalised twice, nor left unnormalised
print("ok")
"""


def test_fla_mixers_on_the_cuda_path_convolve_into_their_heads_as_fla_then_heads_do():
    """A pruned fla mixer on its CUDA path (Triton's interpreter, every tensor reporting ``is_cuda``): its queries,
    keys and values from ``qkv_heads`` through the fused convolutions (two launches) equal the ones through fla's
    convolutions and ``heads`` (taken where a mask wraps ``heads``) bit for bit, then L2-normalised by fla's kernel
    where the recurrence normalises them right after the convolutions (KDA, Gated DeltaNet, DeltaNet with silu; not
    DeltaNet with relu, nor GLA), and not normalised where a capture wraps the recurrence, the forward then telling
    the recurrence to normalise them where, and only where, the convolutions did not; over 37 tokens and over 3
    (fewer than the taps), keeping no cache, and keeping one that starts empty or from given caches (any layout),
    whose new caches equal fla's: KDA with uneven groups, DeltaNet whose queries and keys take no activation or
    silu, Gated DeltaNet, GLA with convolutions."""
    pytest.importorskip("fla.modules.causal_conv1d")
    run_interpreted(MIXERS_INTERPRETED)


def test_the_fused_convolution_runs_on_a_gpu_outside_autograd_for_prefills_only(monkeypatch):
    """``short_conv.takes``: CUDA tensors outside autograd, more than one token, fla's own activations (silu or none;
    queries' and keys' the same), biases on queries and keys both or neither, one number of taps, parameters in the
    inputs' dtype, no hook on a convolution (accelerate's or another)."""
    pytest.importorskip("triton")
    from fla.modules import ShortConvolution

    from compressor.modeling import short_conv

    convs = [ShortConvolution(16, 4, activation=act) for act in ("silu", "silu", "silu")]
    x = torch.randn(1, 5, 16)
    assert not short_conv.takes(x, convs, (8, 8))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with torch.no_grad():
        assert short_conv.takes(x, convs, (8, 8))
        assert not short_conv.takes(x[:, :1], convs, (8, 8))  # a decode step: fla's, which writes its cache in place
        assert not short_conv.takes(x, convs, (8, short_conv.MAX_HEAD_DIM + 1))
        assert not short_conv.takes(x.double(), convs, (8, 8))
        assert short_conv.takes(x, [convs[0], convs[1], ShortConvolution(16, 4, activation=None)], (8, 8))
        assert not short_conv.takes(x, [convs[0], ShortConvolution(16, 4, activation=None), convs[2]], (8, 8))
        assert not short_conv.takes(x, [convs[0], convs[1], ShortConvolution(16, 3)], (8, 8))
        biased = ShortConvolution(16, 4, bias=True, activation="silu")
        assert not short_conv.takes(x, [convs[0], biased, convs[2]], (8, 8))  # one launch takes both or neither
        assert short_conv.takes(x, [convs[0], convs[1], biased], (8, 8))
        convs[2]._hf_hook = object()
        assert not short_conv.takes(x, convs, (8, 8))
        del convs[2]._hf_hook
        handle = convs[1].register_forward_pre_hook(lambda module, args: None)  # it would not fire
        assert not short_conv.takes(x, convs, (8, 8))
        handle.remove()
        assert short_conv.takes(x, convs, (8, 8))
    with torch.enable_grad():
        assert not short_conv.takes(x, convs, (8, 8))


def test_the_value_index_is_not_kept_when_first_made_inside_graph_capture(monkeypatch):
    """``value_index`` (the fused convolution's index of the values) made inside CUDA graph capture is returned but
    not kept (a captured tensor is written only by the graph's replay), as ``slab_index``; made outside, it is kept."""
    from tiny_fla import tiny_fla_model

    mixer = tiny_fla_model("gated_deltanet").model.layers[0].attn
    capturing = {"now": True}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing["now"])
    monkeypatch.setattr(torch, "arange", lambda count, device: object())  # no CUDA here
    cuda = torch.device("cuda")
    assert mixer.value_index(cuda) is not mixer.value_index(cuda)
    capturing["now"] = False
    assert mixer.value_index(cuda) is mixer.value_index(cuda)


@pytest.mark.parametrize("form", ["silu-bias", "state"])
def test_the_short_conv_kernel_compiles_for_an_h100_with_vector_loads(form):
    """``short_conv``'s kernel compiled for sm_90 from bf16 inputs of heads of 128: the inputs loaded 16 bytes at a
    time."""
    pytest.importorskip("triton")
    from compressor.modeling.short_conv import BLOCK_TOKENS, short_conv_kernel

    pointers = dict.fromkeys(("x0", "x1", "taps0", "taps1", "bias0", "bias1", "state0", "state1", "out", "new0",
                              "new1"), "*bf16")
    types = dict(pointers, index="*i64", T="i32", B="i32", HV="i32", NT="i32", C="i32", s_b="i32", s_t="i32",
                 eps="fp32", NP="i32", R="i32")
    constants = {"D": 128, "W": 4, "BT": BLOCK_TOKENS, "BD": 128, "HAS_BIAS": form == "silu-bias",
                 "HAS_STATE": form == "state", "SILU": form == "silu-bias",
                 "NORMALISE": form == "state"}
    assert "ld.global.v4.b32" in hopper_loads(short_conv_kernel, types, constants)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_convolved_heads_on_cuda_equal_flas_convolution():
    """The kernel compiled for a GPU: bf16 queries and keys of 300 tokens, 4 key heads of 128 read by 6 value heads,
    with a cache, against fla's ``ShortConvolution`` and a gather, bit for bit, the new caches too; normalising,
    against fla's l2norm kernel after it, within one rounding of bf16 (the sum of squares may add in another
    order)."""
    from fla.modules import ShortConvolution

    from compressor.modeling.fla_rows import l2_normalised
    from compressor.modeling.short_conv import convolved_heads

    generator = torch.Generator().manual_seed(0)
    convs = [ShortConvolution(512, 4, activation="silu").cuda().to(torch.bfloat16) for _ in "qk"]
    xs = [torch.randn(2, 300, 512, generator=generator).to(torch.bfloat16).cuda() for _ in "qk"]
    caches = [torch.randn(2, 512, 4, generator=generator).to(torch.bfloat16).cuda() for _ in "qk"]
    index = torch.tensor([0, 0, 1, 3, 2, 2], device="cuda")
    with torch.no_grad():
        got, states = convolved_heads(xs, [c.weight.squeeze(1) for c in convs], [None, None], caches, index, 128, True,
                                      output_final_state=True)
        for group, (conv, x, cache) in enumerate(zip(convs, xs, caches)):
            expected, new_cache = conv(x, cache=cache.clone(), output_final_state=True)
            expected = expected.view(2, 300, 4, 128)[:, :, index].transpose(1, 2)
            assert torch.equal(got[group], expected) and torch.equal(states[group], new_cache)
        normalised, _ = convolved_heads(xs, [c.weight.squeeze(1) for c in convs], [None, None], caches, index, 128,
                                        True, 1e-6)
        expected = l2_normalised(got.reshape(-1, 128)).view(got.shape)
        difference = (normalised.float() - expected.float()).abs().max().item()
        print(f"normalised in the convolution vs fla's l2norm: max difference {difference:.3g}, "
              f"{(normalised != expected).float().mean().item():.3%} of values differ")
        torch.testing.assert_close(normalised, expected, rtol=2**-7, atol=2**-14)


@pytest.mark.parametrize("name", ["gated_delta_rule", "kimi_delta_attention"])
def test_recurrences_told_q_and_k_are_normalised_take_them_as_they_are(name):
    """``use_qk_l2norm=False`` (what the forward passes after the fused convolutions normalised q and k): on the
    PyTorch paths of the recurrence (a prefill, a decode step) and of its calibration form, q and k normalised
    beforehand give what the default gives for them raw, and raw q and k are then not normalised."""
    from compressor.modeling.gated_delta import gated_delta_rule
    from compressor.modeling.kda import kimi_delta_attention
    from compressor.state_capture import WITH_STATES

    recurrence = {"gated_delta_rule": gated_delta_rule, "kimi_delta_attention": kimi_delta_attention}[name]
    generator = torch.Generator().manual_seed(0)
    q, k = (3 * torch.randn(2, 20, 3, 8, generator=generator) for _ in "qk")
    v = torch.randn(2, 20, 3, 8, generator=generator)
    decay_shape = (2, 20, 3, 8) if name == "kimi_delta_attention" else (2, 20, 3)
    g, beta = -torch.rand(decay_shape, generator=generator), torch.rand(2, 20, 3, generator=generator)
    unit_q, unit_k = (torch.nn.functional.normalize(x, dim=-1, eps=1e-6) for x in (q, k))
    state = torch.randn(2, 3, 8, 8, generator=generator)
    for length, initial in ((20, None), (1, state)):  # a prefill; a decode step
        inputs = [x[:, :length] for x in (q, k, v, g, beta)]
        unit = [x[:, :length] for x in (unit_q, unit_k)]
        for form in (recurrence, WITH_STATES[recurrence]):
            if form is not recurrence and length == 1:
                continue  # calibration runs prefills only
            expected = form(*inputs, initial_state=initial, output_final_state=True)
            given = form(*unit, *inputs[2:], initial_state=initial, output_final_state=True, use_qk_l2norm=False)
            raw = form(*inputs, initial_state=initial, output_final_state=True, use_qk_l2norm=False)
            for a, b, c in zip(expected[:2], given[:2], raw[:2]):
                assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, c, atol=1e-2), (form, length)


def test_a_value_head_ratio_that_does_not_divide_the_heads_is_refused():
    """fla's layout of value heads that share key heads (``shared_keys``) takes r value heads per key head: the
    kernels that write it refuse an r that does not divide the heads before launching anything."""
    pytest.importorskip("triton")
    from compressor.modeling.channel_gate import DecayGate, gated_chunk_cumulative
    from compressor.modeling.head_gate import head_gates
    from compressor.modeling.short_conv import convolved_heads

    x, index = torch.zeros(1, 5, 8), torch.arange(6) // 3
    calls = (
        lambda: convolved_heads([x], [torch.zeros(8, 4)], [None], [None], index, 4, True, values_per_key=4),
        lambda: head_gates(torch.zeros(1, 5, 6), torch.zeros(1, 5, 6), torch.zeros(6), torch.ones(6),
                           values_per_key=4),
        lambda: gated_chunk_cumulative(torch.zeros(1, 5, 6, 8), DecayGate(torch.zeros(6, 8), torch.ones(6), None),
                                       values_per_key=4),
    )
    for call in calls:
        with pytest.raises(ValueError, match="values_per_key dividing the 6 heads, not 4"):
            call()
