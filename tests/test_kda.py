"""The PyTorch KDA recurrences: chunked against token-by-token, against fla's and transformers' own PyTorch
references, chunk states at every boundary, CPU tensors kept away from Triton, and the CUDA decode step through
fla's functions."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from fla_lookups import looked_up_afresh
from triton_interpreter import run_interpreted, skip_where_the_interpreter_fails_on

import compressor.modeling.kda as kda
from compressor.modeling.kda import chunk_kda_torch, kimi_delta_attention, naive_recurrent_kda
from compressor.state_capture import kda_with_states


@pytest.fixture
def inputs():
    """q, k [2, 150, 3, 16], v [2, 150, 3, 8], per-channel log decays g [2, 150, 3, 16] spread over
    [-2, 0] (some channels forget within a few tokens, others barely), beta [2, 150, 3]."""
    generator = torch.Generator().manual_seed(0)
    batch, length, heads, key_dim, value_dim = 2, 150, 3, 16, 8
    q = torch.randn(batch, length, heads, key_dim, generator=generator)
    k = torch.randn(batch, length, heads, key_dim, generator=generator)
    v = torch.randn(batch, length, heads, value_dim, generator=generator)
    g = -2.0 * torch.rand(batch, length, heads, key_dim, generator=generator) ** 3
    beta = torch.rand(batch, length, heads, generator=generator)
    return q, k, v, g, beta


def naive_states(q, k, v, g, beta):
    """States after every token, by the textbook update in float64 on L2-normalised q/k: [B, H, T, K, V]."""
    k = torch.nn.functional.normalize(k.double(), dim=-1, eps=1e-6)
    batch, length, heads, key_dim = k.shape
    state = torch.zeros(batch, heads, key_dim, v.shape[-1], dtype=torch.float64)
    states = []
    for t in range(length):
        decayed = state * g[:, t].double().exp()[..., None]
        error = v[:, t].double() - torch.einsum("bhk,bhkv->bhv", k[:, t], decayed)
        state = decayed + torch.einsum("bhk,bhv->bhkv", k[:, t], beta[:, t].double()[..., None] * error)
        states.append(state)
    return torch.stack(states, dim=2)


def test_chunk_states_equal_the_naive_recurrence_at_every_boundary(inputs):
    _, final, chunk_states = chunk_kda_torch(*inputs, use_qk_l2norm_in_kernel=True, output_final_state=True,
                                             return_chunk_states=True)
    reference = naive_states(*inputs)
    assert chunk_states.shape == (2, 3, 3, 16, 8)
    assert torch.allclose(chunk_states.double(), reference[:, :, [63, 127, 149]], atol=1e-5)
    assert torch.equal(final, chunk_states[:, :, -1])


def test_chunked_and_token_by_token_agree_with_an_initial_state(inputs):
    initial = torch.randn(2, 3, 16, 8, generator=torch.Generator().manual_seed(1))
    out_chunk, final_chunk, _ = chunk_kda_torch(*inputs, initial_state=initial, output_final_state=True,
                                                use_qk_l2norm_in_kernel=True)
    out_step, final_step = naive_recurrent_kda(*inputs, initial_state=initial, output_final_state=True,
                                               use_qk_l2norm_in_kernel=True)
    assert (out_chunk - out_step).abs().max() < 1e-5
    assert (final_chunk - final_step).abs().max() < 1e-5
    per_head = [chunk_kda_torch(*(x[:, :, [h]] for x in inputs), initial_state=initial[:, [h]],
                                use_qk_l2norm_in_kernel=True)[0] for h in range(3)]
    assert (out_chunk - torch.cat(per_head, dim=2)).abs().max() < 1e-6, "heads are independent"


def test_agrees_with_the_references_of_fla_and_transformers(inputs):
    from fla.ops.kda.naive import naive_recurrent_kda as fla_naive
    from transformers.models.kimi_linear import modeling_kimi_linear

    q, k, v, g, beta = inputs
    q, k = (torch.nn.functional.normalize(x, dim=-1) for x in (q, k))  # fla's naive form does not normalise
    ours, ours_final, _ = chunk_kda_torch(q, k, v, g, beta, output_final_state=True)
    fla_out, fla_final = fla_naive(q, k, v, g, beta, output_final_state=True)
    assert (ours - fla_out).abs().max() < 1e-4 and (ours_final - fla_final).abs().max() < 1e-4
    transformers_chunk = inspect.unwrap(modeling_kimi_linear.chunk_kimi_delta_attention)  # its PyTorch path
    hf_out, hf_final = transformers_chunk(q, k, v, g, beta, output_final_state=True, use_qk_l2norm_in_kernel=True)
    ours, ours_final, _ = chunk_kda_torch(q, k, v, g, beta, output_final_state=True, use_qk_l2norm_in_kernel=True)
    assert (ours - hf_out).abs().max() < 1e-4 and (ours_final - hf_final).abs().max() < 1e-4


def test_a_decay_gate_under_autograd_is_refused():
    """The gate's kernel has no backward: handed the gate's input instead of the decay under autograd, the recurrence
    refuses before anything runs (the mixers hand it the gate outside autograd only)."""
    from compressor.modeling.channel_gate import DecayGate

    q = torch.zeros(1, 4, 1, 8)
    with pytest.raises(ValueError, match="outside autograd only"):
        kimi_delta_attention(q, q, q, q, q[..., 0], decay_gate=DecayGate(torch.zeros(1, 8), torch.ones(1), None))


def test_the_chunk_sums_refuse_a_decay_they_cannot_read():
    """``chunk_cumulative`` reads float32 rows of adjacent channels: anything else is refused before a launch."""
    from compressor.modeling.channel_gate import chunk_cumulative

    g = -torch.rand(1, 70, 2, 8)
    for unreadable in (g.double(), g.transpose(-1, -2).contiguous().transpose(-1, -2)):
        with pytest.raises(ValueError, match="float32 g with unit channel stride"):
            chunk_cumulative(unreadable)


def test_cpu_tensors_never_reach_fla(inputs, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a CPU tensor reached fla's Triton kernel")

    monkeypatch.setattr(kda, "_fla_chunk", forbidden, raising=False)
    monkeypatch.setattr(kda, "_fla_recurrent", forbidden, raising=False)
    out, final = kimi_delta_attention(*inputs, output_final_state=True)
    states = kda_with_states(*inputs, output_final_state=True)[2]
    assert states.shape == (2, 3, 3, 16, 8)
    step, _ = kimi_delta_attention(*(x[:, :1] for x in inputs), initial_state=final, output_final_state=True)
    assert step.shape == (2, 1, 3, 8)


@pytest.mark.parametrize("length", [1, 70], ids=["step", "chunked"])
def test_value_first_states_are_the_key_first_ones_transposed(inputs, length):
    """With ``state_v_first`` the recurrence takes and returns its states [B, H, V, K] (fla's KDA layer's layout):
    from the key-first call's initial state transposed, the same output and that call's final state transposed
    (CPU: the step for one token, the chunked form for more; K = 16, V = 8)."""
    inputs = [x[:, :length] for x in inputs]
    initial = 0.1 * torch.randn(2, 3, 16, 8, generator=torch.Generator().manual_seed(3))
    out, final = kimi_delta_attention(*inputs, initial_state=initial, output_final_state=True)
    got, got_final = kimi_delta_attention(*inputs, initial_state=initial.transpose(-1, -2).contiguous(),
                                          output_final_state=True, state_v_first=True)
    assert got_final.shape == (2, 3, 8, 16)  # sums over a transposed state may round otherwise: to float32's rounding
    torch.testing.assert_close(got, out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_final, final.transpose(-1, -2), rtol=1e-6, atol=1e-6)


KDA_STEP_THROUGH_FLA = """
import torch
from fla.ops.kda import fused_recurrent_kda
from compressor.modeling.fla_decode_step import kda_step_in_place
from compressor.modeling.kda import naive_recurrent_kda
from compressor.modeling.packed_heads import heads_as_batch

generator = torch.Generator().manual_seed(0)
# d 12 and 20: the kernel pads the keys to 16, and the 20 values are one partial block of 32
q, k = (torch.randn(3, 5, 1, 12, generator=generator).transpose(1, 2) for _ in range(2))  # head-major
v = torch.randn(3, 1, 5, 48, generator=generator)[..., :20]  # a slice of a wider tensor
g = -torch.rand(3, 1, 5, 12, generator=generator)  # a log decay per key channel
beta = torch.rand(3, 1, 5, generator=generator)
options = dict(initial_state=torch.randn(3, 5, 12, 20, generator=generator), output_final_state=True,
               use_qk_l2norm_in_kernel=True, scale=0.2)  # not 12^-0.5: a layer whose query/key channels were cut
expected = naive_recurrent_kda(q, k, v, g, beta, **options)
got = heads_as_batch(fused_recurrent_kda, dict(q=q, k=k, v=v, g=g, beta=beta), **options)
for name, a, b in zip(("output", "state"), got, expected):
    assert a.shape == b.shape and (a - b).abs().max() < 1e-5, ("public", name, (a - b).abs().max())
state = options["initial_state"].clone()
got = heads_as_batch(kda_step_in_place, dict(q=q, k=k, v=v, g=g, beta=beta), **{**options, "initial_state": state})
for name, a, b in zip(("output", "state"), got, expected):
    assert a.shape == b.shape and (a - b).abs().max() < 1e-5, ("in place", name, (a - b).abs().max())
assert got[1].data_ptr() == state.data_ptr() and (state - expected[1]).abs().max() < 1e-5  # over the old one
value_first = dict(options, initial_state=options["initial_state"].transpose(-1, -2).contiguous(), state_v_first=True)
got = heads_as_batch(fused_recurrent_kda, dict(q=q, k=k, v=v, g=g, beta=beta), **value_first)
assert (got[0] - expected[0]).abs().max() < 1e-5 and (got[1].transpose(-1, -2) - expected[1]).abs().max() < 1e-5
state = value_first["initial_state"].clone()
got = heads_as_batch(kda_step_in_place, dict(q=q, k=k, v=v, g=g, beta=beta), **{**value_first, "initial_state": state})
assert (got[0] - expected[0]).abs().max() < 1e-5 and got[1].data_ptr() == state.data_ptr()
assert (state.transpose(-1, -2) - expected[1]).abs().max() < 1e-5
print("ok")
"""


def test_the_kda_decode_step_through_flas_own_functions_equals_the_reference():
    """The CUDA decode step's calls of fla's KDA step (heads as batch entries, through fla's public function and
    with the state written over itself), run on the CPU by Triton's interpreter, at a query scale other than
    d_k^-0.5, with key-first and value-first states: fla's argument names, shapes and state layouts as the shipped
    code assumes."""
    pytest.importorskip("fla.ops.kda")
    skip_where_the_interpreter_fails_on("the token loop of fla's KDA step")
    run_interpreted(KDA_STEP_THROUGH_FLA)


def test_the_kda_step_writes_in_place_only_through_the_fla_function_it_was_written_for(monkeypatch):
    """The in-place KDA step is offered only by an fla whose KDA forward takes ``inplace_final_state`` (else
    ``kda_step()`` is None and the step takes fla's public function), and only for a state the kernel can update."""
    fused_recurrent = pytest.importorskip("fla.ops.kda.fused_recurrent")
    from compressor.modeling import fla_decode_step

    fla_decode_step.kda_step.cache_clear()
    assert fla_decode_step.kda_step() is fused_recurrent.fused_recurrent_kda_fwd
    assert not fla_decode_step.can_step_kda_in_place(torch.zeros(4, 1, 8, 8))  # a CPU tensor
    original = fused_recurrent.fused_recurrent_kda_fwd

    def older(q, k, v, g, beta, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False, out=None):
        raise AssertionError("never called")

    with looked_up_afresh(fla_decode_step.kda_step, monkeypatch):
        monkeypatch.setattr(fused_recurrent, "fused_recurrent_kda_fwd", older)
        assert fla_decode_step.kda_step() is None
    assert fla_decode_step.kda_step() is original


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the in-place decode step runs on CUDA tensors")
def test_the_cuda_kda_decode_step_writes_the_state_over_itself_and_equals_the_reference():
    """kimi_delta_attention's CUDA decode step at a query scale other than d_k^-0.5: the reference's output and
    state, the state written over the cache's tensor outside autograd, and a new state with autograd on."""
    pytest.importorskip("fla")
    generator = torch.Generator().manual_seed(4)
    q, k = (torch.randn(2, 1, 3, 12, generator=generator).cuda() for _ in range(2))
    v = torch.randn(2, 1, 3, 20, generator=generator).cuda()
    g = (-0.3 * torch.rand(2, 1, 3, 12, generator=generator)).cuda()
    beta = torch.rand(2, 1, 3, generator=generator).cuda()
    initial = torch.randn(2, 3, 12, 20, generator=generator).cuda()
    expected = naive_recurrent_kda(q, k, v, g, beta, initial_state=initial, output_final_state=True,
                                   use_qk_l2norm_in_kernel=True, scale=0.2)
    for grad in (False, True):
        state = initial.clone()
        with torch.set_grad_enabled(grad):
            got = kimi_delta_attention(q, k, v, g, beta, initial_state=state, output_final_state=True, scale=0.2)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert (got[1].data_ptr() == state.data_ptr()) != grad


CHANNEL_GATE_INTERPRETED = """
import torch
import torch.nn.functional as F
from compressor.modeling.channel_gate import LOG2_E, DecayGate, channel_gate, chunk_cumulative, gated_chunk_cumulative
from compressor.modeling.packed_heads import CHUNK_SIZE

generator = torch.Generator().manual_seed(0)
for batch, length, heads, width, dtype in ((2, 37, 3, 96, torch.bfloat16), (1, 70, 2, 128, torch.float32),
                                           (3, 1, 4, 40, torch.float32)):  # 40: a last block of channels in part
    f = (4 * torch.randn(batch, length, heads, width, generator=generator)).to(dtype)
    f[0, 0, 0, :2] = torch.tensor([30.0, -30.0])  # both sides of the softplus threshold
    bias = torch.randn(heads, width, generator=generator)
    rate = torch.rand(heads, generator=generator) + 0.1
    x = f.float() + bias
    for lower_bound, expected in ((None, -rate[:, None] * F.softplus(x)),
                                  (-5.0, -5.0 * torch.sigmoid(rate[:, None] * x))):
        got = channel_gate(f, bias, rate, lower_bound)
        assert got.dtype == torch.float32 and got.shape == f.shape and got.transpose(1, 2).is_contiguous()
        error = ((got - expected).abs() / (expected.abs() + 1e-6)).max().item()
        assert error < 1e-5, (batch, length, heads, width, lower_bound, error)
        chunks = F.pad(got, (0, 0, 0, 0, 0, -length % CHUNK_SIZE)).view(batch, -1, CHUNK_SIZE, heads, width)
        sums = chunks.cumsum(2).view(batch, -1, heads, width)[:, :length] * LOG2_E
        for g in (got, got.contiguous()):  # head-major, as channel_gate writes it, and token-major
            cumulative = chunk_cumulative(g)
            assert cumulative.shape == g.shape and cumulative.transpose(1, 2).is_contiguous()
            torch.testing.assert_close(cumulative, sums, rtol=1e-5, atol=1e-5)
        fused = gated_chunk_cumulative(f, DecayGate(bias, rate, lower_bound))  # the decay never written
        assert fused.transpose(1, 2).is_contiguous() and torch.equal(fused, chunk_cumulative(got))
        if heads % 2 == 0:  # two value heads per key head, interleaved token by token (fla's layout for them)
            shared = gated_chunk_cumulative(f, DecayGate(bias, rate, lower_bound), values_per_key=2)
            assert shared.shape == (batch, length, heads // 2, 2, width) and shared.transpose(1, 2).is_contiguous()
            assert torch.equal(shared.reshape(fused.shape), fused)
assert channel_gate(torch.empty(2, 0, 3, 8), torch.zeros(3, 8), torch.ones(3), None).shape == (2, 0, 3, 8)
try:
    channel_gate(torch.zeros(1, 4, 8, 2).transpose(2, 3), torch.zeros(2, 8), torch.ones(2), None)
    raise AssertionError("channel_gate read channels that are not adjacent")
except ValueError:
    pass
g = channel_gate(torch.tensor([float("nan"), 1.0]).view(1, 1, 1, 2), torch.zeros(1, 2), torch.ones(1), None)
assert g[0, 0, 0, 0].isnan() and not g[0, 0, 0, 1].isnan()  # NaN stays NaN, as in F.softplus
x = torch.linspace(-80.0, 30.0, 200 * 128).view(1, 200, 1, 128)  # the series, the log and x, to float32's normal range
exact = -F.softplus(x.double())
error = ((channel_gate(x, torch.zeros(1, 128), torch.ones(1), None).double() - exact).abs() / exact.abs()).max()
assert error < 2e-6, error.item()
thin = -torch.rand(70, 6, generator=generator)  # one channel 6 apart: a gated-delta decay's heads as batch entries
single = torch.as_strided(thin, (6, 70, 1, 1), (1, 6, 6, 6))
sums = F.pad(single, (0, 0, 0, 0, 0, 58)).view(6, 2, CHUNK_SIZE, 1, 1).cumsum(2).view(6, 128, 1, 1)[:, :70] * LOG2_E
torch.testing.assert_close(chunk_cumulative(single), sums, rtol=1e-5, atol=1e-5)
print("ok")
"""

GATED_MIXER_INTERPRETED = """
import sys
import torch
sys.path[:0] = ["tests"]
from emulated_cuda import cuda_path
from tiny_fla import tiny_fla_model
from compressor.families import family_for
from compressor.layers import linear_layers
from compressor.modeling import channel_gate as gates
from compressor.modeling import kda

model = tiny_fla_model("kda_gva")
mixer = linear_layers(model, family_for(model.config))[0]
launched = []
for name in ("channel_gate", "gated_chunk_cumulative", "chunk_cumulative"):
    def counted(*arguments, kernel=getattr(gates, name), name=name, **options):
        launched.append(name)
        return kernel(*arguments, **options)
    for module in (kda, sys.modules[type(mixer).__module__]):
        if hasattr(module, name):
            setattr(module, name, counted)
hidden = torch.randn(1, 9, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
outputs = {}
for wrapped in (False, True):
    if wrapped:
        mixer.recurrence = type(mixer).recurrence  # as a capture wraps it: the decay written, then summed
    del launched[:]
    with torch.no_grad(), cuda_path():
        outputs[wrapped] = mixer(hidden)[0]
    mixer.__dict__.pop("recurrence", None)
    expected = ["channel_gate", "chunk_cumulative"] if wrapped else ["gated_chunk_cumulative"]
    assert launched == expected, (wrapped, launched)
assert torch.equal(outputs[False], outputs[True])
print("ok")
"""


def test_the_channel_gate_kernel_equals_pytorch_and_writes_head_major():
    """KDA's decay kernel (``channel_gate.py``) run by Triton's interpreter against PyTorch's formula: lengths that are
    not a multiple of its token block, key head sizes that are not powers of two, bf16 and float32 inputs, both gate
    forms; the result head-major. The softplus on 25,600 values from -80 to 30 against float64, to 2e-6 of each
    value however small (a term of the series dropped, its branch moved to 1/8, or tiny values flushed to 0 break
    it). A wrong offset of the input, the output or the parameters moves
    values by O(1). Its chunk-local sums (``chunk_cumulative``) of the decay, read head-major and token-major,
    against PyTorch's cumulative sum over each chunk of 64 tokens, one of which crosses a chunk's end, key widths
    whose channels fill one, several and part of a block of the sums' programs; the gate and its sums in one launch
    (``gated_chunk_cumulative``) bit for bit the two launches; f whose channels are not adjacent refused; a single
    channel whose stride is not 1 (a gated-delta decay's heads as batch entries, one token of each) read."""
    pytest.importorskip("triton")
    run_interpreted(CHANNEL_GATE_INTERPRETED)


def test_flas_kda_mixer_hands_its_recurrence_the_gate_and_a_wrapped_one_the_decay():
    """fla's KDA mixer on its CUDA path (every tensor reporting ``is_cuda``), under Triton's interpreter: it hands its
    own recurrence the gate's input and parameters, and the recurrence computes the gate and its chunk-local sums in
    one launch; where a capture wraps the recurrence, the decay is written and then summed (two launches). The
    mixer's output is the same bit for bit."""
    skip_where_the_interpreter_fails_on("the chunked KDA kernels")
    run_interpreted(GATED_MIXER_INTERPRETED)


KIMI_MODULES_INTERPRETED = """
import sys
import torch
sys.path[:0] = ["tests"]
from emulated_cuda import cuda_path
from tiny_hybrids import tiny_hybrid
from compressor.modeling.modeling_kimi_linear import PrunedKimiDeltaAttention

model = tiny_hybrid("kimi_linear")
layer = PrunedKimiDeltaAttention.adopt(model.model.layers[0].self_attn)
generator = torch.Generator().manual_seed(0)
heads, width = layer.num_heads, layer.head_dim

hidden = torch.randn(2, 37, model.config.hidden_size, generator=generator)
with torch.no_grad():
    expected = layer.forget_gate(hidden)
    with cuda_path():
        got = layer.channel_decay(hidden)
assert got.shape == expected.shape and got.transpose(1, 2).is_contiguous()  # head-major: the kernel wrote it
torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # the stock softplus rounds tiny values to 0
assert expected.abs().max() > 1e-2

with torch.no_grad():
    layer.o_norm.weight.copy_(1 + torch.randn(width, generator=generator))
out = torch.randn(2, heads, 37, width, generator=generator).transpose(1, 2)  # head-major, as the recurrence returns
gate = 3 * torch.randn(2, 37, heads, width, generator=generator)
with torch.no_grad():
    expected = layer.o_norm(out, gate)
    layer.o_norm.forward = None  # the CUDA path must not fall back to the stock module
    with cuda_path():
        got = layer.output_norm(out, gate)
assert got.shape == expected.shape and got.is_contiguous()
torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
print("ok")
"""


def test_kimi_linears_decay_and_output_norm_on_the_cuda_path_equal_its_stock_modules():
    """Kimi Linear's KDA layer on its CUDA path (run by Triton's interpreter, in one process): its decay through
    ``channel_gate``, written head-major, equals its stock forget gate's; its output norm of the recurrence's
    head-major output through ``head_norm``, with the stock module barred, equals the stock sigmoid-gated norm."""
    pytest.importorskip("triton")
    run_interpreted(KIMI_MODULES_INTERPRETED)


def test_kimi_linears_decay_takes_the_stock_gate_once_where_the_kernel_cannot_serve(monkeypatch):
    """On its CUDA path Kimi Linear's decay goes through ``channel_gate`` (the gate's projections computed once),
    except where accelerate hooks the forget gate or the key heads are wider than the kernel takes: then through the
    stock gate alone, its projections not computed twice."""
    from tiny_hybrids import tiny_hybrid

    from compressor.modeling import channel_gate, modeling_kimi_linear

    pytest.importorskip("triton")
    model = tiny_hybrid("kimi_linear")
    layer = modeling_kimi_linear.PrunedKimiDeltaAttention.adopt(model.model.layers[0].self_attn)
    kernel_calls, projections = [], []
    monkeypatch.setattr(modeling_kimi_linear, "channel_gate", lambda *arguments: kernel_calls.append(arguments))
    layer.forget_gate.f_a_proj.register_forward_hook(lambda *arguments: projections.append(1))
    hidden = torch.randn(1, 5, model.config.hidden_size)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with torch.no_grad():
        layer.channel_decay(hidden)
        assert (len(kernel_calls), len(projections)) == (1, 1)
        layer.forget_gate._hf_hook = object()
        assert layer.channel_decay(hidden).shape == (1, 5, layer.num_heads, layer.head_dim)
        assert (len(kernel_calls), len(projections)) == (1, 2)
        del layer.forget_gate._hf_hook
        monkeypatch.setattr(channel_gate, "MAX_KEY_DIM", layer.head_dim - 1)
        assert layer.channel_decay(hidden).shape == (1, 5, layer.num_heads, layer.head_dim)
        assert (len(kernel_calls), len(projections)) == (1, 3)


def test_the_kda_decay_takes_the_kernel_on_a_gpu_outside_autograd_only(monkeypatch):
    """Which inputs ``channel_gate.takes``: CUDA-shaped, float32, outside autograd; not CPU tensors, not float64
    parameters, not under autograd, not key heads wider than ``MAX_KEY_DIM`` (Kimi Linear asks ``runs`` before it
    projects f)."""
    from compressor.modeling import channel_gate

    pytest.importorskip("triton")
    f = torch.randn(1, 4, 2, 8)
    assert not channel_gate.takes(f, torch.float32) and not channel_gate.runs(f, 8)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with torch.no_grad():
        assert channel_gate.takes(f, torch.float32) and channel_gate.runs(f, channel_gate.MAX_KEY_DIM)
        assert not channel_gate.runs(f, channel_gate.MAX_KEY_DIM + 1)
        assert not channel_gate.takes(f, torch.float64)
        assert not channel_gate.takes(f.transpose(1, 2), torch.float32)
    with torch.enable_grad():
        assert not channel_gate.takes(f, torch.float32) and not channel_gate.runs(f, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("lower_bound", [None, -5.0])
def test_the_channel_gate_on_cuda_equals_pytorch(lower_bound):
    """The kernel compiled for a GPU: bf16 f of 300 tokens, 5 heads of 128, against PyTorch's formula in float32;
    the gate and its chunk sums in one launch against the two launches (to float32's rounding: the compiler may
    order the two programs' operations differently); the softplus, with the GPU's approximate log2, on 25,600 values
    from -80 to 30 to 1e-5 of each against float64."""
    pytest.importorskip("triton")
    from compressor.modeling.channel_gate import DecayGate, channel_gate, chunk_cumulative, gated_chunk_cumulative

    generator = torch.Generator().manual_seed(0)
    f = (4 * torch.randn(2, 300, 5, 128, generator=generator)).to(torch.bfloat16).cuda()
    bias, rate = torch.randn(5, 128, generator=generator).cuda(), (torch.rand(5, generator=generator) + 0.1).cuda()
    x = f.float() + bias
    expected = -rate[:, None] * F.softplus(x) if lower_bound is None else lower_bound * torch.sigmoid(rate[:, None] * x)
    got = channel_gate(f, bias, rate, lower_bound)
    assert got.transpose(1, 2).is_contiguous()
    assert ((got - expected).abs() / (expected.abs() + 1e-6)).max() < 1e-4
    torch.testing.assert_close(gated_chunk_cumulative(f, DecayGate(bias, rate, lower_bound)), chunk_cumulative(got))
    if lower_bound is None:  # the GPU's approximate exp and log2, from -80 to 30 against float64
        x = torch.linspace(-80.0, 30.0, 200 * 128, device="cuda").view(1, 200, 1, 128)
        exact = -F.softplus(x.double())
        got = channel_gate(x, torch.zeros(1, 128, device="cuda"), torch.ones(1, device="cuda"), None)
        assert ((got.double() - exact).abs() / exact.abs()).max() < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_diagonal_blocks_on_cuda_equal_flas_token_parallel_kernel():
    """The kernel compiled for a GPU, against fla's token-parallel kernel on the same 12 one-head entries of 300
    tokens, heads of 128, bf16: the same entries written, equal to float32's rounding before the scores are
    rounded to bf16 (the two reduce each row's 128 products in their own order; the interpreted test of the direct
    forwards in ``test_fla_chunk.py`` checks them bit for bit)."""
    pytest.importorskip("fla.ops.kda")
    from fla.ops.kda.chunk_intra_token_parallel import chunk_kda_fwd_intra_token_parallel

    from compressor.modeling.channel_gate import chunk_cumulative
    from compressor.modeling.kda_diagonal import BLOCK, diagonal_blocks

    generator = torch.Generator(device="cuda").manual_seed(0)
    shape = (12, 300, 1, 128)
    q, k = (F.normalize(torch.randn(shape, device="cuda", generator=generator), dim=-1).to(torch.bfloat16)
            for _ in "qk")
    g = chunk_cumulative(F.logsigmoid(torch.randn(shape, device="cuda", generator=generator)) / 16)
    beta = torch.rand(shape[:3], device="cuda", generator=generator).to(torch.bfloat16)
    written = []
    for write in (lambda *scores: chunk_kda_fwd_intra_token_parallel(q=q, k=k, gk=g, beta=beta, Aqk=scores[0],
                                                                      Akk=scores[1], scale=0.1, chunk_size=64,
                                                                      sub_chunk_size=BLOCK),
                  lambda *scores: diagonal_blocks(q, k, g, beta, 0.1, *scores)):
        scores = (torch.full((*shape[:3], 64), float("nan"), device="cuda", dtype=torch.bfloat16),
                  torch.full((*shape[:3], BLOCK), float("nan"), device="cuda"))
        write(*scores)
        written.append(scores)
    (fla_aqk, fla_akk), (our_aqk, our_akk) = written
    torch.testing.assert_close(our_akk, fla_akk, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(our_aqk.float(), fla_aqk.float(), rtol=2**-7, atol=1e-6, equal_nan=True)


def test_the_diagonal_blocks_refuse_what_their_kernel_does_not_read():
    """``kda_diagonal.diagonal_blocks`` takes one query/key head per batch entry, chunks of a whole number of blocks and
    contiguous tensors: anything else is refused before a launch."""
    from compressor.modeling.kda_diagonal import BLOCK, diagonal_blocks

    q, g, beta = torch.zeros(2, 40, 1, 8), torch.zeros(2, 40, 1, 8), torch.zeros(2, 40, 1)
    scores, blocks = torch.zeros(2, 40, 1, 64), torch.zeros(2, 40, 1, BLOCK)
    for arguments, message in (((q.expand(2, 40, 2, 8), q, g, beta, 0.1, scores, blocks), "one query/key head per"),
                               ((q, q, g, beta, 0.1, torch.zeros(2, 40, 1, 40), blocks), "multiple of"),
                               ((q, q.transpose(0, 1).contiguous().transpose(0, 1), g, beta, 0.1, scores, blocks),
                                "contiguous")):
        with pytest.raises(ValueError, match=message):
            diagonal_blocks(*arguments)


def test_the_channel_gate_refuses_a_token_stride_its_int32_offsets_would_overflow():
    """Offsets within a program are int32: a token stride whose chunk of tokens reaches 2**31 elements is refused
    before anything launches (meta tensors: no memory)."""
    from compressor.modeling.channel_gate import chunk_cumulative

    g = torch.empty_strided((1, 2, 1, 8), (2**26, 2**25, 8, 1), device="meta")
    with pytest.raises(ValueError, match="token stride below"):
        chunk_cumulative(g)
