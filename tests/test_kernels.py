"""The PyTorch recurrences against a naive per-token loop, and CPU tensors kept away from Triton."""

from __future__ import annotations

import pytest
import torch
from fla_lookups import looked_up_afresh
from tiny_models import recurrence_inputs, tiny_model
from hopper import hopper_loads
from triton_interpreter import run_interpreted, skip_where_the_interpreter_fails_on

from compressor.modeling.gated_delta import chunk_gated_delta_rule_torch, recurrent_gated_delta_rule_torch
from compressor.modeling.packed_heads import (
    head_major,
    heads_as_batch,
    heads_as_sequences,
    normalised,
    normalised_by,
    sequence_index,
)
from compressor.state_capture import STATES_DOT_PRECISION, states_dot_precision


def naive_states(q, k, v, g, beta):
    """States after every token, by the textbook update on unnormalised inputs: [B, H, T, K, V]."""
    q, k = (torch.nn.functional.normalize(x, dim=-1, eps=1e-6) for x in (q, k))
    batch, length, heads, key_dim = k.shape
    state = torch.zeros(batch, heads, key_dim, v.shape[-1], dtype=torch.float64)
    states = []
    for t in range(length):
        kt, vt = k[:, t].double(), v[:, t].double()  # [B, H, K], [B, H, V]
        decayed = state * g[:, t].double().exp()[..., None, None]
        error = vt - torch.einsum("bhk,bhkv->bhv", kt, decayed)
        state = decayed + torch.einsum("bhk,bhv->bhkv", kt, beta[:, t].double()[..., None] * error)
        states.append(state)
    return torch.stack(states, dim=2)


@pytest.fixture
def inputs():
    generator = torch.Generator().manual_seed(0)
    batch, length, heads, key_dim, value_dim = 2, 150, 3, 16, 8
    q = torch.randn(batch, length, heads, key_dim, generator=generator)
    k = torch.randn(batch, length, heads, key_dim, generator=generator)
    v = torch.randn(batch, length, heads, value_dim, generator=generator)
    g = -0.3 * torch.rand(batch, length, heads, generator=generator)
    beta = torch.rand(batch, length, heads, generator=generator)
    return q, k, v, g, beta


def test_chunk_states_equal_the_naive_recurrence_at_every_boundary(inputs):
    _, _, chunk_states = chunk_gated_delta_rule_torch(*inputs, use_qk_l2norm_in_kernel=True, return_chunk_states=True)
    reference = naive_states(*inputs)
    boundaries = [63, 127, 149]  # after 64, 128 and the last (partial) chunk
    assert chunk_states.shape == (2, 3, 3, 16, 8)
    assert torch.allclose(chunk_states.double(), reference[:, :, boundaries], atol=1e-5)


def test_chunked_and_recurrent_outputs_agree_with_an_initial_state(inputs):
    initial = torch.randn(2, 3, 16, 8, generator=torch.Generator().manual_seed(1))
    out_chunk, final_chunk, _ = chunk_gated_delta_rule_torch(
        *inputs, initial_state=initial, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    out_step, final_step = recurrent_gated_delta_rule_torch(
        *inputs, initial_state=initial, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    assert (out_chunk - out_step).abs().max() < 1e-5
    assert (final_chunk - final_step).abs().max() < 1e-5


def float64_forms(name: str):
    """(chunked form, token-by-token form, float64 inputs in the order both take) of one recurrence module."""
    from compressor.modeling import delta_rule, gla, kda

    generator = torch.Generator().manual_seed(4)
    q, k, gates = (torch.randn(2, 150, 3, 16, generator=generator, dtype=torch.float64) for _ in range(3))
    q, k = (torch.nn.functional.normalize(x, dim=-1) for x in (q, k))  # unit keys: the delta rules stay bounded
    v = torch.randn(2, 150, 3, 8, generator=generator, dtype=torch.float64)
    decay, beta = (torch.rand(2, 150, 3, generator=generator, dtype=torch.float64) for _ in range(2))
    decay = -0.3 * decay
    per_channel = -0.3 * gates.sigmoid()
    return {
        "gated_delta": (chunk_gated_delta_rule_torch, recurrent_gated_delta_rule_torch, (q, k, v, decay, beta)),
        "delta_rule": (delta_rule.chunk_delta_rule_torch, delta_rule.recurrent_delta_rule_torch, (q, k, v, beta)),
        "gla": (gla.chunk_gla_torch, gla.recurrent_gla_torch, (q, k, v, per_channel)),
        "kda": (kda.chunk_kda_torch, kda.naive_recurrent_kda, (q, k, v, per_channel, beta)),
    }[name]


@pytest.mark.parametrize("name", ["gated_delta", "delta_rule", "gla", "kda"])
def test_float64_inputs_are_computed_in_float64(name):
    """The PyTorch forms keep float64 inputs in float64: the chunked and token-by-token forms, which order their
    sums differently, agree to 1e-12 (in float32 they differ by about 1e-7), and the states stay float64."""
    chunked, token_by_token, args = float64_forms(name)
    initial = torch.randn(2, 3, 16, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    options = dict(initial_state=initial, output_final_state=True)
    out_chunk, final_chunk = chunked(*args, **options)[:2]
    out_step, final_step = token_by_token(*args, **options)
    assert out_chunk.dtype == final_chunk.dtype == final_step.dtype == torch.float64
    assert (out_chunk - out_step).abs().max() < 1e-12
    assert (final_chunk - final_step).abs().max() < 1e-12


@pytest.mark.parametrize("length", [1, 150])
def test_heads_packed_as_sequences_give_the_same_outputs_and_states(inputs, length):
    """What the CUDA path does around fla's kernels (every head a sequence of its own, packed back to back), checked
    with the PyTorch recurrence run sequence by sequence as fla's varlen kernels do: outputs and states per head
    and per sequence land where they came from, and the kernel sees batch 1 and one head."""
    q, k, v, g, beta = (x[:, :length] for x in inputs)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # head-major, as the mixers hand them over
    initial = torch.randn(2, 3, 16, 8, generator=torch.Generator().manual_seed(2))

    def varlen_kernel(q, k, v, g, beta, initial_state, output_final_state, cu_seqlens, chunk_indices):
        assert q.shape == (1, 6 * length, 1, 16) and beta.shape == (1, 6 * length, 1)
        assert cu_seqlens.tolist() == [n * length for n in range(7)] and initial_state.shape == (6, 1, 16, 8)
        chunks = -(-length // 64)
        assert chunk_indices.tolist() == [[n, c] for n in range(6) for c in range(chunks)]
        outs, finals = [], []
        for n, (begin, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
            out, final, _ = chunk_gated_delta_rule_torch(
                *(x[:, begin:end] for x in (q, k, v, g, beta)), initial_state=initial_state[n : n + 1],
                output_final_state=output_final_state, use_qk_l2norm_in_kernel=True)
            outs.append(out)
            finals.append(final)
        return torch.cat(outs, dim=1), torch.cat(finals)

    out, final = heads_as_sequences(varlen_kernel, dict(q=q, k=k, v=v, g=g, beta=beta), initial_state=initial,
                                    also=("chunk_indices",), output_final_state=True)
    expected_out, expected_final, _ = chunk_gated_delta_rule_torch(
        q, k, v, g, beta, initial_state=initial, output_final_state=True, use_qk_l2norm_in_kernel=True)
    assert out.shape == expected_out.shape and final.shape == expected_final.shape
    assert (out - expected_out).abs().max() < 1e-6
    assert (final - expected_final).abs().max() < 1e-6


def test_heads_as_batch_entries_give_the_same_decode_step(inputs):
    """The decode step's packing (every head a batch entry of one head): outputs and states land where they came
    from, for inputs as the mixers hand them over (q head-major, v a slice of a wider tensor)."""
    q, k, v, g, beta = (x[:, :1] for x in inputs)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    v = torch.cat([v, torch.zeros_like(v)], dim=-1)[..., :8]  # strided, as a split of the fused projection
    initial = torch.randn(2, 3, 16, 8, generator=torch.Generator().manual_seed(3))

    def batched_kernel(q, k, v, g, beta, initial_state, output_final_state, use_qk_l2norm_in_kernel):
        assert q.shape == (6, 1, 1, 16) and g.shape == (6, 1, 1) and initial_state.shape == (6, 1, 16, 8)
        return recurrent_gated_delta_rule_torch(q, k, v, g, beta, initial_state=initial_state,
                                                output_final_state=output_final_state,
                                                use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)

    out, final = heads_as_batch(batched_kernel, dict(q=q, k=k, v=v, g=g, beta=beta), initial_state=initial,
                                output_final_state=True, use_qk_l2norm_in_kernel=True)
    expected_out, expected_final = recurrent_gated_delta_rule_torch(
        q, k, v, g, beta, initial_state=initial, output_final_state=True, use_qk_l2norm_in_kernel=True)
    assert out.shape == expected_out.shape and final.shape == expected_final.shape
    assert (out - expected_out).abs().max() < 1e-6
    assert (final - expected_final).abs().max() < 1e-6


DECODE_STEP_THROUGH_FLA = """
import torch
from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule
from compressor.modeling.fla_decode_step import step_in_place
from compressor.modeling.gated_delta import recurrent_gated_delta_rule_torch
from compressor.modeling.packed_heads import heads_as_batch, heads_as_sequences

generator = torch.Generator().manual_seed(0)
# d_k 12 and d_v 20: the kernel pads the keys to 16 and splits the values into blocks of 8, the last one partial
q, k = (torch.randn(3, 5, 1, 12, generator=generator).transpose(1, 2) for _ in range(2))  # head-major
v = torch.randn(3, 1, 5, 48, generator=generator)[..., :20]  # a slice of a wider tensor
g, beta = -torch.rand(3, 1, 5, generator=generator), torch.rand(3, 1, 5, generator=generator)
options = dict(initial_state=torch.randn(3, 5, 12, 20, generator=generator), output_final_state=True,
               use_qk_l2norm_in_kernel=True, scale=0.2)  # not 12^-0.5: a layer whose query/key channels were cut
expected = recurrent_gated_delta_rule_torch(q, k, v, g, beta, **options)
for pack in (heads_as_batch, heads_as_sequences):
    got = pack(fused_recurrent_gated_delta_rule, dict(q=q, k=k, v=v, g=g, beta=beta), **options)
    for name, a, b in zip(("output", "state"), got, expected):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-5, (pack.__name__, name, (a - b).abs().max())
state = options["initial_state"].clone()
got = heads_as_batch(step_in_place, dict(q=q, k=k, v=v, g=g, beta=beta), **{**options, "initial_state": state})
for name, a, b in zip(("output", "state"), got, expected):
    assert a.shape == b.shape and (a - b).abs().max() < 1e-5, ("in place", name, (a - b).abs().max())
assert got[1].data_ptr() == state.data_ptr() and (state - expected[1]).abs().max() < 1e-5  # over the old one
print("ok")
"""


def test_the_decode_step_through_flas_own_kernel_equals_the_reference():
    """The CUDA decode step's calls of fla's kernel (heads as batch entries, through fla's public function and
    launched with the state written over itself; heads as sequences beside them), run on the CPU by Triton's
    interpreter, at a query scale other than d_k^-0.5: fla's argument names, shapes and state layout as the shipped
    code assumes."""
    pytest.importorskip("fla.ops.gated_delta_rule")
    skip_where_the_interpreter_fails_on("the token loop of fla's gated delta rule step")
    run_interpreted(DECODE_STEP_THROUGH_FLA)


@pytest.mark.parametrize("count, length", [(6, 150), (40, 2048), (3, 1)])
def test_chunk_indices_are_the_ones_fla_derives(count, length):
    """The chunk indices handed to fla equal what fla would compute (with a read of the GPU) from the starts."""
    index_module = pytest.importorskip("fla.ops.utils.index")
    index = sequence_index(count, length, torch.device("cpu"))
    assert torch.equal(index["cu_seqlens"], index["cu_seqlens_cpu"])
    for name, prepare in (("chunk_indices", index_module.prepare_chunk_indices),
                          ("chunk_offsets", index_module.prepare_chunk_offsets)):
        expected = prepare(index["cu_seqlens"], 64)
        assert torch.equal(index[name], expected) and index[name].dtype == expected.dtype, name
    assert sequence_index(count, length, torch.device("cpu")) is index  # same objects: fla's identity caches hit
    with torch.inference_mode():
        inference = sequence_index(count, length, torch.device("cpu"))
    assert inference is not index and inference["cu_seqlens"].is_inference()  # never handed to autograd
    assert not index["cu_seqlens"].is_inference()


@pytest.mark.parametrize("config_name", ["qwen3_next_moe", "qwen3_5"])
def test_cpu_forward_never_touches_triton(triton_forbidden, config_name):
    model = tiny_model(config_name)
    ids = torch.randint(3, 96, (1, 80))
    with torch.no_grad():
        model(ids)
        model.generate(ids[:, :10], max_new_tokens=2, do_sample=False, pad_token_id=0)
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        q, k, v = (torch.randn(1, 64, 2, 16) for _ in range(3))
        with pytest.raises(Exception, match="Triton kernel was launched|active drivers"):  # the check sees fla
            chunk_gated_delta_rule(q, k, v, -torch.rand(1, 64, 2), torch.rand(1, 64, 2))


@pytest.mark.parametrize(("capability", "hip", "expected"), [
    ((9, 0), None, STATES_DOT_PRECISION), ((8, 0), None, STATES_DOT_PRECISION), ((7, 5), None, "ieee"),
    ((9, 4), "6.2", "ieee"),
])
def test_states_take_tf32x3_only_on_nvidia_gpus_with_tf32(monkeypatch, capability, hip, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", hip)
    assert states_dot_precision(torch.device("cuda", 0)) == expected


def test_queries_and_keys_normalised_as_fla_does_keep_their_dtype_and_layout():
    """The chunked CUDA path normalises q and k before packing (fla's l2norm: float32, x / sqrt(sum x² + 1e-6))."""
    x = torch.randn(2, 5, 3, 16, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    x = x.transpose(1, 2).contiguous().transpose(1, 2)  # head-major
    y = normalised(x)
    reference = x.double() / (x.double().pow(2).sum(-1, keepdim=True) + 1e-6).sqrt()
    assert y.dtype == torch.bfloat16 and y.stride() == x.stride()
    assert (y.double() - reference).abs().max() <= 2**-8  # one bfloat16 rounding of values below 1


def rows_read_as_fla_does(rows: torch.Tensor, eps: float) -> torch.Tensor:
    """fla's l2norm kernel as it reads memory: row i at i·D from the first element, whatever the strides."""
    read = rows.as_strided(rows.shape, (rows.shape[-1], 1)).float()
    return (read * torch.rsqrt((read * read).sum(-1, keepdim=True) + eps)).to(rows.dtype)


@pytest.mark.parametrize("tokens", [slice(0, 1), slice(3, 4), slice(2, 5), slice(None)],
                         ids=["first-token", "one-token", "three-tokens", "all"])
@pytest.mark.parametrize("batch,heads", [(1, 3), (2, 1), (2, 3)])
def test_slices_of_head_major_queries_reach_fla_normalised(batch, heads, tokens):
    """A rollback runs its tokens one at a time on slices of head-major q and k (``RecordedDecodeSteps.recur``); a
    one-token slice reshapes to rows a sequence apart, which fla's l2norm kernel would read as if contiguous.
    Through a stand-in that reads memory as that kernel does, every slice gives PyTorch's values."""
    x = head_major(torch.randn(batch, 6, heads, 16, generator=torch.Generator().manual_seed(4)))[:, tokens]
    torch.testing.assert_close(normalised_by(rows_read_as_fla_does, x), normalised(x), rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's l2norm runs on CUDA tensors")
@pytest.mark.parametrize("heads", [3, 40])
def test_queries_and_keys_normalised_by_fla_in_one_launch_equal_pytorch(heads):
    """On CUDA, ``normalised`` launches fla's l2norm kernel once, on any number of rows (40 heads x 2 x 1000 tokens:
    more than the 65,536 that fla's own wrapper counts as one step); it must give PyTorch's values, head-major."""
    pytest.importorskip("fla")
    from compressor.modeling import fla_rows, packed_heads

    x = torch.randn(2, 1000, heads, 128, device="cuda").to(torch.bfloat16)
    x = x.transpose(1, 2).contiguous().transpose(1, 2)  # head-major
    with torch.no_grad():
        by_fla = packed_heads.normalised(x)
    by_torch = packed_heads.normalised(x.cpu()).cuda()
    assert fla_rows.l2norm_kernel() is not None and by_fla.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(by_fla.float(), by_torch.float(), rtol=0, atol=2**-8)


def test_a_gate_computed_from_its_head_major_copy_packs_without_a_copy():
    """``head_major`` casts and lays out [B, T, H] (or [B, T, H, ·]) in one copy; the elementwise ops of a gate keep
    that layout, so ``pack`` of the result is a view of its memory, with the values of the token-major form."""
    from compressor.modeling.packed_heads import head_major, pack

    a = torch.randn(2, 7, 3, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    rate, bias = torch.rand(3).to(torch.bfloat16), torch.randn(3).to(torch.bfloat16)
    copied = head_major(a, torch.float32)
    assert copied.dtype == torch.float32 and torch.equal(copied, a.float()) and copied.transpose(1, 2).is_contiguous()
    gate = torch.nn.functional.softplus(copied + bias) * -rate.float().exp()
    expected = -rate.float().exp() * torch.nn.functional.softplus(a.float() + bias.float())
    torch.testing.assert_close(gate, expected, rtol=1e-6, atol=0)  # the CPU's vector and scalar paths may differ
    assert pack(gate).data_ptr() == gate.data_ptr() and torch.equal(pack(gate), pack(gate.contiguous()))
    channels = head_major(torch.randn(2, 7, 3, 4))
    assert channels.transpose(1, 2).is_contiguous() and pack(channels).data_ptr() == channels.data_ptr()
    assert head_major(channels).data_ptr() == channels.data_ptr()  # already head-major: no copy


@pytest.mark.parametrize("name", ["qwen3_5", "qwen3_next_dense"])
def test_the_transformers_mixers_hand_their_recurrence_the_stock_decay_head_major(name):
    """g = -exp(A_log) · softplus(a + dt_bias), as the stock transformers forward computes it, laid out head-major so
    that packing heads takes a view of it."""
    model = tiny_model(name)
    mixer = model.model.layers[0].linear_attn
    hidden, (g, _) = recurrence_inputs(model, mixer, torch.randint(3, 96, (2, 40),
                                                                    generator=torch.Generator().manual_seed(7)))
    with torch.no_grad():
        a = mixer.project(hidden)[3]
        expected = -mixer.A_log.float().exp() * torch.nn.functional.softplus(a.float() + mixer.dt_bias)
    torch.testing.assert_close(g, expected, rtol=1e-6, atol=1e-7)
    assert g.transpose(1, 2).is_contiguous()


def test_the_decay_parameters_are_kept_until_a_parameter_changes():
    """In eval mode and outside autograd a mixer keeps dt_bias and -exp(A_log) between forwards (bf16 parameters, so
    that what is kept is a float32 copy); a change of either parameter in place or in new memory must give the new
    values, a write that bypasses the version counter (``.data``, as fused optimizers write) those after the next
    ``eval()``, and autograd must reach the parameters."""
    mixer = tiny_model("qwen3_5").model.layers[0].linear_attn.to(torch.bfloat16)
    a = torch.randn(2, 5, mixer.num_v_heads, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)

    def stock() -> torch.Tensor:
        return -mixer.A_log.float().exp() * torch.nn.functional.softplus(a.float() + mixer.dt_bias)

    with torch.no_grad():
        kept = mixer.decay_parameters(torch.float32)
        assert all(x is y for x, y in zip(mixer.decay_parameters(torch.float32), kept))
        torch.testing.assert_close(mixer.decay(a), stock(), rtol=1e-6, atol=1e-7)
        mixer.A_log.add_(0.5)
        torch.testing.assert_close(mixer.decay(a), stock(), rtol=1e-6, atol=1e-7)
        mixer.dt_bias.data = mixer.dt_bias.data + 1.0
        torch.testing.assert_close(mixer.decay(a), stock(), rtol=1e-6, atol=1e-7)
        mixer.A_log.data.add_(0.25)  # no version bump
        mixer.eval()
        torch.testing.assert_close(mixer.decay(a), stock(), rtol=1e-6, atol=1e-7)
        mixer.train()
        assert not any(x is y for x, y in zip(mixer.decay_parameters(torch.float32),
                                              mixer.decay_parameters(torch.float32)))  # nothing kept in training
    gate = mixer.decay(a)
    gate.sum().backward()
    assert mixer.A_log.grad is not None and mixer.dt_bias.grad is not None
    torch.testing.assert_close(gate.detach(), stock().detach(), rtol=1e-6, atol=1e-7)


def test_the_decay_of_a_model_built_under_inference_mode_follows_its_parameters():
    """Parameters made under ``torch.inference_mode`` keep no version counter: nothing is kept for them, and a change
    in place still reaches the decay."""
    with torch.inference_mode():
        mixer = tiny_model("qwen3_5").model.layers[0].linear_attn
        a = torch.randn(2, 5, mixer.num_v_heads, generator=torch.Generator().manual_seed(3))
        before = mixer.decay(a)
        mixer.A_log.add_(0.5)
        after = mixer.decay(a)
        expected = -mixer.A_log.float().exp() * torch.nn.functional.softplus(a.float() + mixer.dt_bias)
    assert mixer.A_log.is_inference() and not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["qwen3_5", "qwen3_next_dense"])
def test_a_forward_under_inference_mode_leaves_the_model_trainable(name):
    """What a mixer builds once and keeps (its key-head index) must not be an inference tensor: a later backward
    pass saves it."""
    model = tiny_model(name)
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        model(ids)
    model(ids).logits.sum().backward()


def test_the_write_strength_is_written_head_major_outside_autograd():
    from compressor.modeling.packed_heads import pack, sigmoid_head_major

    b = torch.randn(2, 7, 3, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        beta = sigmoid_head_major(b)
    assert torch.equal(beta, b.sigmoid()) and pack(beta).data_ptr() == beta.data_ptr()
    b.requires_grad_(True)
    sigmoid_head_major(b).sum().backward()
    torch.testing.assert_close(b.grad, (b.sigmoid() * (1 - b.sigmoid())).detach())


HEAD_GATE_INTERPRETED = """
import torch
import torch.nn.functional as F
from compressor.modeling.head_gate import head_gates, rows_of, write_strengths

generator = torch.Generator().manual_seed(0)
for batch, length, heads, dtype, beta_scale in ((2, 300, 3, torch.bfloat16, 1.0), (1, 70, 5, torch.float32, 2.0),
                                                (3, 1, 4, torch.bfloat16, 2.0)):
    a = (4 * torch.randn(batch, length, 2 * heads + 1, generator=generator)).to(dtype)[..., heads:2 * heads]
    b = (4 * torch.randn(batch, length, heads + 3, generator=generator)).to(dtype)[..., :heads]
    # a: tokens 2H + 1 apart, at an offset; b: tokens H + 3 apart
    a[0, 0, :2] = torch.tensor([30.0, -30.0])  # both sides of the softplus threshold
    bias = torch.randn(heads, generator=generator)
    scale = -(torch.rand(heads, generator=generator) + 0.1)
    assert rows_of(a) and rows_of(b) and a.stride(1) != b.stride(1) and heads not in (a.stride(1), b.stride(1))
    g, beta = head_gates(a, b, bias, scale, beta_scale)
    expected = scale * F.softplus(a.float() + bias)
    assert g.dtype == torch.float32 and g.shape == a.shape and g.transpose(1, 2).is_contiguous()
    assert ((g - expected).abs() / (expected.abs() + 1e-6)).max() < 1e-5, (batch, length, heads)
    assert beta.dtype == dtype and beta.shape == b.shape and beta.transpose(1, 2).is_contiguous()
    # within one rounding of the dtype (the interpreter's bf16 casts need not round to nearest as a GPU's do)
    torch.testing.assert_close(beta.float(), beta_scale * b.float().sigmoid(), atol=0,
                               rtol=1e-6 if dtype == torch.float32 else 2 ** -7)
    # beta in float32 (fla's layers), with g or alone: sigmoid(b) not rounded to b's dtype
    g32, beta32 = head_gates(a, b, bias, scale, beta_scale, beta_dtype=torch.float32)
    alone = write_strengths(b, beta_scale)
    assert torch.equal(g32, g) and torch.equal(alone, beta32) and alone.transpose(1, 2).is_contiguous()
    assert beta32.dtype == alone.dtype == torch.float32 and beta32.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(beta32, beta_scale * b.float().sigmoid(), atol=0, rtol=1e-6)
    if heads % 2 == 0:  # two heads per key head, interleaved token by token (fla's layout for shared key heads)
        shared = head_gates(a, b, bias, scale, beta_scale, values_per_key=2)
        for got, flat in zip((*shared, write_strengths(b, beta_scale, values_per_key=2)), (g, beta, beta32)):
            assert got.shape == (batch, length, heads // 2, 2) and got.transpose(1, 2).is_contiguous()
            assert torch.equal(got.reshape(flat.shape), flat), (batch, length, heads)
empty = torch.empty(2, 0, 3)
assert all(x.shape == (2, 0, 3) for x in head_gates(empty, empty, torch.zeros(3), torch.ones(3)))
g, beta = head_gates(torch.tensor([[[float("nan"), 1.0]]]), torch.zeros(1, 1, 2), torch.zeros(2), -torch.ones(2))
assert g[0, 0, 0].isnan() and not g[0, 0, 1].isnan()  # NaN stays NaN, as in F.softplus
misread = torch.randn(2, 9, 3)[:, :5]  # batch entries 9 tokens apart, not 5
try:
    head_gates(misread, misread, torch.zeros(3), torch.ones(3))
except ValueError:
    pass
else:
    raise AssertionError("a layout the kernel misreads was taken")
print("ok")
"""


def test_the_head_gate_kernel_equals_pytorch_and_writes_head_major():
    """Gated DeltaNet's decay and write-strength kernel (``head_gate.py``) run by Triton's interpreter against
    PyTorch's formulas: a and b strided views of wider projections (a at an offset; tokens apart by other strides than
    each other's and than the head count), lengths that are not a multiple of its token block, a single token, bf16 and
    float32, beta scaled by 1 and 2, NaN kept; results head-major; a layout it would misread refused. A wrong offset
    or stride of an input, an output or a parameter moves values by O(1). beta written in float32 (with g, or alone
    by ``write_strengths``) is sigmoid(b) unrounded, in the same layouts."""
    pytest.importorskip("triton")
    run_interpreted(HEAD_GATE_INTERPRETED)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_head_gate_on_cuda_equals_pytorch():
    """The kernel compiled for a GPU: a bf16 strided view of a fused projection and a contiguous b, 3000 tokens of 48
    heads, against PyTorch's formulas (beta rounded once to bf16, as PyTorch's sigmoid rounds it; in float32 with g,
    and alone, for fla's layers, also two value heads per key head)."""
    pytest.importorskip("triton")
    from compressor.modeling.head_gate import head_gates, write_strengths

    generator = torch.Generator().manual_seed(0)
    a = (4 * torch.randn(2, 3000, 97, generator=generator)).to(torch.bfloat16).cuda()[..., 48:96]
    b = (4 * torch.randn(2, 3000, 48, generator=generator)).to(torch.bfloat16).cuda()
    bias, scale = torch.randn(48, generator=generator).cuda(), -(torch.rand(48, generator=generator) + 0.1).cuda()
    g, beta = head_gates(a, b, bias, scale, 2.0)
    expected = scale * torch.nn.functional.softplus(a.float() + bias)
    assert g.transpose(1, 2).is_contiguous() and beta.transpose(1, 2).is_contiguous()
    assert ((g - expected).abs() / (expected.abs() + 1e-6)).max() < 1e-5
    assert (beta.float() - (2 * b.sigmoid()).float()).abs().max() <= 2 ** -7
    g32, beta32 = head_gates(a, b, bias, scale, 2.0, values_per_key=2, beta_dtype=torch.float32)
    alone = write_strengths(b, 2.0, values_per_key=2)
    assert g32.shape == alone.shape == (2, 3000, 24, 2) and torch.equal(g32.reshape(g.shape), g)
    assert torch.equal(beta32, alone) and alone.dtype == torch.float32 and alone.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(alone.reshape(b.shape), 2 * b.float().sigmoid(), atol=0, rtol=4e-6)  # Triton's exp


def gated_deltanet_mixer(name: str) -> torch.nn.Module:
    """The first Gated DeltaNet mixer of a tiny model under the shipped class: Qwen3.5, OLMo-Hybrid (beta in (0, 2)) or
    fla's (beta in (0, 2))."""
    if name == "olmo_hybrid":
        from tiny_hybrids import tiny_hybrid

        return tiny_hybrid(name).model.layers[0].linear_attn
    if name == "gated_deltanet":
        from tiny_fla import tiny_fla_model

        return tiny_fla_model("gated_deltanet_gva", allow_neg_eigval=True).model.layers[0].attn
    return tiny_model(name).model.layers[0].linear_attn


@pytest.mark.parametrize("name", ["qwen3_5", "olmo_hybrid", "gated_deltanet"])
def test_the_mixers_take_both_gates_from_one_kernel_on_a_gpu_outside_autograd(name, monkeypatch):
    """On the CUDA path, outside autograd, a mixer's beta and g come from one ``head_gates`` call with its kept decay
    parameters and its beta scale (2 where negative eigenvalues are allowed); under autograd from PyTorch, with the
    same values."""
    pytest.importorskip("triton")
    from compressor.modeling import gated_deltanet, head_gate

    mixer = gated_deltanet_mixer(name)
    assert isinstance(mixer, gated_deltanet.PrunableGatedDeltaNetMixin)
    heads = mixer.num_v_heads
    generator = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 5, heads, generator=generator), torch.randn(2, 5, heads, generator=generator)
    with torch.no_grad():
        expected = mixer.write_strength(b), mixer.decay(a)
    assert mixer.beta_scale == (1.0 if name == "qwen3_5" else 2.0)
    torch.testing.assert_close(expected[0], mixer.beta_scale * b.sigmoid())
    calls = []

    def kernel(*arguments, beta_dtype):
        calls.append((*arguments, beta_dtype))
        return expected[1], expected[0]

    monkeypatch.setattr(gated_deltanet, "head_gates", kernel)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    with torch.no_grad():
        assert head_gate.takes(a, b, torch.float32) and not head_gate.takes(a, b, torch.float64)
        assert not head_gate.takes(a, b[:, :3], torch.float32) and not head_gate.takes(a.double(), b, torch.float32)
        longer = torch.randn(2, 9, heads)
        for misread in (longer[:, :5],  # batch entries 9 tokens apart, not 5
                        torch.randn(2, 5, 2 * heads)[..., ::2],  # heads 2 apart
                        torch.randn(5, 2, heads).transpose(0, 1)):  # tokens apart by more than the batch entries
            assert misread.shape == a.shape and not head_gate.takes(misread, b, torch.float32)
            assert not head_gate.takes(a, misread, torch.float32)
        one_token = torch.randn(1, 2, heads).transpose(0, 1)  # T = 1, batch entries H apart, token stride 2H
        assert one_token.stride(0) != one_token.stride(1) and not head_gate.rows_of(one_token)
        beta, g = mixer.gates(a, b)
        assert all(x is y for x, y in zip(calls[0][2:4], mixer.decay_parameters(torch.float32)))
    assert beta is expected[0] and g is expected[1] and len(calls) == 1
    assert calls[0][0] is a and calls[0][1] is b and calls[0][4] == mixer.beta_scale and calls[0][5:] == (1, b.dtype)
    beta, g = mixer.gates(a, b)  # under autograd: PyTorch
    assert len(calls) == 1
    torch.testing.assert_close(beta, expected[0])
    torch.testing.assert_close(g, expected[1])


@pytest.mark.parametrize("name", ["qwen3_5", "olmo_hybrid", "gated_deltanet", "kda"])
def test_fla_s_layers_write_beta_in_float32_and_transformers_layers_in_b_s_dtype(name, monkeypatch):
    """fla's stock layers hand b's logits to kernels that apply the sigmoid in float32; transformers' layers round
    sigmoid(b) to b's dtype. From a bf16 b, each shipped mixer writes beta as its stock layer does, head-major (and in
    fla's layout for value heads sharing key heads): in PyTorch, and on the CUDA path through one kernel (with g, or
    alone for KDA, whose decay has its own)."""
    pytest.importorskip("triton")
    from compressor.modeling import gated_deltanet

    if name == "kda":
        from tiny_fla import tiny_fla_model

        mixer = tiny_fla_model("kda_gva").model.layers[0].attn
    else:
        mixer = gated_deltanet_mixer(name)
    in_float32 = name in ("gated_deltanet", "kda")
    heads, scale = mixer.num_v_heads, mixer.beta_scale
    b = (4 * torch.randn(2, 5, heads, generator=torch.Generator().manual_seed(5))).to(torch.bfloat16)
    expected = scale * (b.float().sigmoid() if in_float32 else b.sigmoid().float())
    with torch.no_grad():
        beta, shared = mixer.write_strength(b), mixer.write_strength(b, 2)
    assert beta.dtype == shared.dtype == (torch.float32 if in_float32 else torch.bfloat16)
    assert beta.transpose(1, 2).is_contiguous() and shared.shape == (2, 5, heads // 2, 2)
    assert shared.transpose(1, 2).is_contiguous() and torch.equal(shared.reshape(beta.shape), beta)
    torch.testing.assert_close(beta.float(), expected, atol=0, rtol=0)
    calls = []
    monkeypatch.setattr(gated_deltanet, "head_gates",
                        lambda *arguments, beta_dtype: calls.append((arguments[5], beta_dtype)) or (expected, beta))
    monkeypatch.setattr(gated_deltanet, "write_strengths", lambda *arguments: calls.append(arguments) or beta)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    with torch.no_grad():
        if name == "kda":
            assert mixer.write_strength(b, 2) is beta and calls == [(b, scale, 2, torch.float32)]
        else:
            assert mixer.gates(b, b)[0] is beta and mixer.gates(b, b, 2)[0] is beta  # 2: fla's shared-key layout
            assert calls == [(r, torch.float32 if in_float32 else torch.bfloat16) for r in (1, 2)]


def test_one_gather_of_queries_and_keys_reads_the_mapped_key_heads_and_stays_head_major():
    from compressor.modeling.gated_deltanet import PrunableGatedDeltaNetMixin

    mixer = PrunableGatedDeltaNetMixin()
    mixer.layer_idx, mixer.num_k_heads, mixer.num_v_heads, mixer.head_k_dim = 0, 3, 5, 4
    mixer.set_value_to_key([2, 0, 0, 1, 2])
    query_key = torch.randn(2, 7, 2 * 3 * 4, generator=torch.Generator().manual_seed(5))
    query, key = mixer.queries_and_keys(query_key)
    for got, part in ((query, query_key[..., :12]), (key, query_key[..., 12:])):
        expected = part.reshape(2, 7, 3, 4)[:, :, [2, 0, 0, 1, 2]]
        assert torch.equal(got, expected)
        assert got.transpose(1, 2).is_contiguous()  # the recurrence packs heads as sequences without a copy


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's gated norm runs on CUDA tensors")
@pytest.mark.parametrize("rows", [5, 65536 + 300])
def test_gated_norm_on_cuda_equals_the_stock_module(rows):
    pytest.importorskip("fla")
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNormGated

    from compressor.modeling import gated_deltanet

    norm = Qwen3NextRMSNormGated(128, eps=1e-6).cuda()
    torch.nn.init.normal_(norm.weight)
    x, gate = torch.randn(2, rows, 128, device="cuda").unbind()
    x = x * 1e-3  # rms² ≈ 1e-6, as large as eps: another eps would show
    with torch.no_grad():
        fused = gated_deltanet.gated_rms_norm(norm, x, gate)
        expected = norm(x, gate)
    assert gated_deltanet.gated_norm_kernel() is not None and fused.shape == expected.shape
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # bfloat16: the stock forward rounds before the weight, fla at the end
        half = gated_deltanet.gated_rms_norm(norm.bfloat16(), x.bfloat16(), gate.bfloat16())
    torch.testing.assert_close(half.float(), expected, rtol=2e-2, atol=2e-2)
    assert torch.equal(gated_deltanet.gated_rms_norm(norm, x.bfloat16(), gate.bfloat16()),
                       norm(x.bfloat16(), gate.bfloat16()))  # with autograd on: the stock forward


def test_the_in_place_decode_step_is_taken_only_with_the_kernel_it_was_written_for(monkeypatch):
    """A different fla kernel signature, or a state the kernel cannot update in place, sends the decode step to
    fla's public function."""
    fused_recurrent = pytest.importorskip("fla.ops.gated_delta_rule.fused_recurrent")
    from compressor.modeling import fla_decode_step

    fla_decode_step.kernel.cache_clear()
    assert fla_decode_step.kernel() is fused_recurrent.fused_recurrent_gated_delta_rule_fwd_kernel
    state = torch.zeros(4, 1, 8, 8)
    assert not fla_decode_step.can_step_in_place(state)  # a CPU tensor
    original = fused_recurrent.fused_recurrent_gated_delta_rule_fwd_kernel
    renamed = type("Kernel", (), {"arg_names": [*original.arg_names[:-1], "ALLOW_NEGATIVE_EIGENVALUES"]})()
    with looked_up_afresh(fla_decode_step.kernel, monkeypatch):
        monkeypatch.setattr(fused_recurrent, "fused_recurrent_gated_delta_rule_fwd_kernel", renamed)
        assert fla_decode_step.kernel() is None
    assert fla_decode_step.kernel() is original


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the in-place decode step runs on CUDA tensors")
def test_the_cuda_decode_step_writes_the_state_over_itself_and_equals_the_reference():
    """gated_delta_rule's CUDA decode step at a query scale other than d_k^-0.5 (a channel-cut layer's): the
    reference's output and state, the state written over the cache's tensor outside autograd, and a new state with
    autograd on."""
    pytest.importorskip("fla")
    from compressor.modeling.gated_delta import gated_delta_rule

    generator = torch.Generator().manual_seed(4)  # d_k 12 and d_v 20: padded keys, a partial block of values
    q, k = (torch.randn(2, 1, 3, 12, generator=generator).cuda() for _ in range(2))
    v = torch.randn(2, 1, 3, 20, generator=generator).cuda()
    g, beta = (-0.3 * torch.rand(2, 1, 3, generator=generator)).cuda(), torch.rand(2, 1, 3, generator=generator).cuda()
    initial = torch.randn(2, 3, 12, 20, generator=generator).cuda()
    expected = recurrent_gated_delta_rule_torch(q, k, v, g, beta, initial_state=initial, output_final_state=True,
                                                use_qk_l2norm_in_kernel=True, scale=0.2)
    for grad in (False, True):
        state = initial.clone()
        with torch.set_grad_enabled(grad):
            got = gated_delta_rule(q, k, v, g, beta, initial_state=state, output_final_state=True, scale=0.2)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert (got[1].data_ptr() == state.data_ptr()) != grad


HEAD_GATHER_INTERPRETED = """
import torch
from compressor.modeling.head_gather import gather_heads

generator = torch.Generator().manual_seed(0)
index = torch.tensor([2, 0, 0, 1, 2])
for dtype in (torch.float32, torch.bfloat16):
    q, k = (torch.randn(3, 37, 3 * 96, generator=generator).to(dtype) for _ in "qk")  # fla's projections [B, T, H_k·d]
    conv = torch.randn(2, 2 * 3 * 96, 45, generator=generator).to(dtype)[..., 5:]  # a convolution's [B, C, T], offset
    layouts = {
        "token-major, two tensors": [x.view(3, 37, 3, 96).transpose(1, 2) for x in (q, k)],
        "channel-major, two halves": conv.transpose(1, 2).reshape(2, 40, 2, 3, 96).permute(2, 0, 3, 1, 4).unbind(0),
        "one group, one token": [q[:, 5:6].view(3, 1, 3, 96).transpose(1, 2)],
        "channel-major, whole blocks of tokens": conv.transpose(1, 2)[:, 8:].reshape(2, 32, 2, 3, 96).permute(
            2, 0, 3, 1, 4).unbind(0),
    }
    for name, groups in layouts.items():
        got = gather_heads(groups, index)
        assert got.is_contiguous() and got.dtype == dtype, name
        assert torch.equal(got, torch.stack(groups)[:, :, index]), name
    out = torch.full((2, 2, 5, 40, 96), float("nan"), dtype=dtype)
    assert gather_heads(layouts["channel-major, two halves"], index, out=out) is out
    assert torch.equal(out, torch.stack(layouts["channel-major, two halves"])[:, :, index])
assert gather_heads([torch.empty(2, 3, 0, 8)], index).shape == (1, 2, 5, 0, 8)
heads = layouts["token-major, two tensors"]
for groups, index_given, out in (
    (heads, index, torch.empty(2, 3, 5, 96, 37)),  # an out of another shape
    ([heads[0], heads[1].contiguous()], index, None),  # two layouts
    (heads * 2, index, None),  # four groups
    (heads, index[::2], None),  # a strided index
    (heads, index.float(), None),
):
    try:
        gather_heads(groups, index_given, out=out)
    except ValueError:
        pass
    else:
        raise AssertionError("gather_heads wrote what it cannot")
print("ok")
"""


def test_the_head_gather_kernel_copies_the_mapped_key_heads_from_any_layout():
    """``head_gather.py``'s kernel run by Triton's interpreter: queries and keys as two tensors read token-major (fla's
    projections), as two halves of one channel-major block from an offset (transformers' convolution), one group of
    one decode token; lengths that are and are not a multiple of its token block, a head size that is not a power of
    two;
    every value head must equal its key head exactly, head-major. A wrong stride, offset, group or index moves whole
    heads."""
    pytest.importorskip("triton")
    run_interpreted(HEAD_GATHER_INTERPRETED)


def test_the_head_gather_kernel_takes_gpu_tensors_of_one_layout_outside_autograd_only(monkeypatch):
    from compressor.modeling import head_gather

    pytest.importorskip("triton")
    q, k = torch.randn(2, 2, 4, 3, 8).unbind()
    assert not head_gather.takes([q, k])
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with torch.no_grad():
        assert head_gather.takes([q, k]) and head_gather.takes([q]) and not head_gather.takes([])
        assert not head_gather.takes([q, k.transpose(1, 2).contiguous().transpose(1, 2)])  # another layout
        assert not head_gather.takes([q, k.half()]) and not head_gather.takes([q, q, q])
        assert not head_gather.takes([torch.randn(2, 4, 3, 512)])
    with torch.enable_grad():
        assert not head_gather.takes([q, k])


@pytest.mark.parametrize("cuda_path", [False, True], ids=["pytorch", "kernel"])
def test_a_mixer_hands_the_kernel_its_key_index_or_gathers_slabs_itself(cuda_path, monkeypatch):
    """``gathered_heads``: where ``head_gather`` takes the groups, it hands them and the layer's value-to-key index
    to the kernel (replaced here by PyTorch's indexing: the kernel is tested above) and returns its block; otherwise
    PyTorch's slab gather gives the same value heads, one contiguous block."""
    from compressor.modeling import gated_deltanet
    from compressor.modeling.gated_deltanet import PrunableGatedDeltaNetMixin

    mixer = PrunableGatedDeltaNetMixin()
    mixer.layer_idx, mixer.num_k_heads, mixer.num_v_heads, mixer.head_k_dim = 0, 3, 5, 4
    mixer.set_value_to_key([2, 0, 0, 1, 2])
    groups = torch.randn(2, 7, 2, 3, 4, generator=torch.Generator().manual_seed(3)).permute(2, 0, 3, 1, 4).unbind(0)
    calls = []
    if cuda_path:
        monkeypatch.setattr(gated_deltanet, "gather_takes", lambda groups: True)
        monkeypatch.setattr(gated_deltanet, "gather_heads", lambda groups, index: calls.append(index.tolist()) or
                            torch.stack(groups)[:, :, index].contiguous())
    with torch.no_grad():
        got = mixer.gathered_heads(groups)
    assert got.is_contiguous() and torch.equal(got, torch.stack(groups)[:, :, [2, 0, 0, 1, 2]])
    assert calls == ([[2, 0, 0, 1, 2]] if cuda_path else [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_head_gather_kernel_on_cuda_copies_the_mapped_key_heads():
    """The kernel compiled for a GPU: bf16 key heads of 128, queries and keys token-major and channel-major, 300
    tokens."""
    pytest.importorskip("triton")
    from compressor.modeling.head_gather import gather_heads

    generator = torch.Generator().manual_seed(0)
    index = torch.tensor([3, 0, 0, 1, 2, 3, 3], device="cuda")
    q, k = (torch.randn(2, 300, 4 * 128, generator=generator).to(torch.bfloat16).cuda() for _ in "qk")
    conv = torch.randn(2, 2 * 4 * 128, 303, generator=generator).to(torch.bfloat16).cuda()[..., 3:]
    for groups in ([x.view(2, 300, 4, 128).transpose(1, 2) for x in (q, k)],
                   conv.transpose(1, 2).reshape(2, 300, 2, 4, 128).permute(2, 0, 3, 1, 4).unbind(0)):
        assert torch.equal(gather_heads(groups, index), torch.stack(groups)[:, :, index])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_head_gather_kernel_on_cuda_writes_past_two_to_the_31st_element():
    """Offsets in 64 bits: the second value head's last tokens lie past element 2³¹ of the output (3.2 GB on the GPU)."""
    pytest.importorskip("triton")
    from compressor.modeling.head_gather import gather_heads

    length = 2**31 // (2 * 128) + 64
    heads = torch.empty(1, 1, length, 128, dtype=torch.bfloat16, device="cuda")
    heads[:, :, -64:] = torch.randn(64, 128, device="cuda").to(torch.bfloat16)
    out = gather_heads([heads], torch.tensor([0, 0], device="cuda"))
    assert out[0, 0, 1, -64:].data_ptr() - out.data_ptr() >= 2**31 * out.element_size()  # int32 offsets stop at 2³¹ - 1
    assert torch.equal(out[0, 0, 1, -64:], heads[0, 0, -64:])


@pytest.mark.parametrize("layout", ["token-major", "channel-major"])
def test_the_head_gather_kernel_compiles_for_an_h100_with_vector_loads(layout):
    """Triton's interpreter runs what its compiler may refuse: the kernel compiled for sm_90 as a prefill launches it
    (length a multiple of the token block), its key heads loaded 16 bytes at a time, in both layouts (Triton
    vectorises only along a dimension it knows contiguous, aligned and unmasked)."""
    pytest.importorskip("triton")
    from compressor.modeling.head_gather import BLOCK_TOKENS, head_gather_kernel

    pointers = dict(first="*bf16", second="*bf16", index="*i64", out="*bf16")
    counts = dict(T="i32", B="i32", HV="i32", NT="i32", s_b="i32", s_h="i32")
    unit = "s_c" if layout == "token-major" else "s_t"
    strided = {"s_t" if layout == "token-major" else "s_c": "i32"}
    loads = hopper_loads(head_gather_kernel, {**pointers, **counts, **strided},
                         {unit: 1, "D": 128, "BT": BLOCK_TOKENS, "BD": 128, "WHOLE_BLOCKS": True})
    assert "ld.global.v4.b32" in loads, loads


@pytest.mark.parametrize("form", ["softplus", "bounded", "chunk-sums", "gated-chunk-sums"])
def test_the_channel_gate_kernel_compiles_for_an_h100_with_vector_loads(form):
    """KDA's decay kernel (``channel_gate.py``) compiled for sm_90 with the GPU's approximate log2: bf16 f (for the
    gate, alone or with its chunk sums), or for the chunk-local sums float32 g, loaded 16 bytes at a time."""
    pytest.importorskip("triton")
    from compressor.modeling.channel_gate import (
        BLOCK_TOKENS,
        NUM_WARPS,
        SUM_BLOCK_CHANNELS,
        SUM_NUM_WARPS,
        channel_gate_kernel,
    )
    from compressor.modeling.packed_heads import CHUNK_SIZE

    gated = form != "chunk-sums"
    cumulative = form.endswith("chunk-sums")
    types = dict(f="*bf16" if gated else "*fp32", bias="*fp32", rate="*fp32", out="*fp32", lower_bound="fp32",
                 scale="fp32", T="i32", H="i32", NT="i32", NK="i32", s_b="i32", s_t="i32", s_h="i32", R="i32")
    constants = {"K": 128, "BT": CHUNK_SIZE if cumulative else BLOCK_TOKENS,
                 "BK": SUM_BLOCK_CHANNELS if cumulative else 128, "GATED": gated, "BOUNDED": form == "bounded",
                 "CUMULATIVE": cumulative, "FAST_LOG": True}
    loads = hopper_loads(channel_gate_kernel, types, constants, SUM_NUM_WARPS if cumulative else NUM_WARPS)
    assert "ld.global.v4.b32" in loads, loads
