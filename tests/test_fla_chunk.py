"""fla's chunked forward beneath its public functions' wrappers (``compressor/modeling/fla_chunk.py``): found only
where fla's functions take the parameters it passes, used only where it may be, and equal to the public functions."""

from __future__ import annotations

import pytest
import torch
from fla_lookups import looked_up_afresh
from triton_interpreter import run_interpreted, skip_where_the_interpreter_fails_on

from compressor.modeling import fla_chunk
from compressor.modeling.channel_gate import chunk_cumulative
from compressor.modeling.packed_heads import sequence_index

pytest.importorskip("fla")


def test_the_forward_functions_of_fla_0_6_are_found():
    from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_h
    from fla.ops.common.chunk_h import chunk_fwd_kernel_h
    from fla.ops.common.chunk_o import chunk_fwd_o
    from fla.ops.delta_rule.chunk import chunk_delta_rule_fwd
    from fla.ops.gated_delta_rule.chunk_fwd import chunk_gated_delta_rule_fwd_intra
    from fla.ops.gla.chunk import chunk_gla_fwd_intra_gk, chunk_gla_fwd_o_gk
    from fla.ops.kda.chunk_intra import chunk_kda_fwd_kernel_inter_solve_fused
    from fla.ops.kda.wy_fast import recompute_w_u_fwd
    from fla.ops.utils.constant import RCP_LN2
    from fla.ops.utils.cumsum import chunk_local_cumsum_vector

    assert fla_chunk.gated_delta_forward() == (chunk_gated_delta_rule_fwd_intra, chunk_gated_delta_rule_fwd_h,
                                               chunk_fwd_o)
    assert fla_chunk.delta_forward() is chunk_delta_rule_fwd
    assert fla_chunk.kda_forward() == (chunk_kda_fwd_kernel_inter_solve_fused, recompute_w_u_fwd,
                                       chunk_gated_delta_rule_fwd_h, chunk_gla_fwd_o_gk)
    assert fla_chunk.gla_forward() == (chunk_local_cumsum_vector, chunk_fwd_kernel_h, chunk_gla_fwd_intra_gk,
                                       chunk_gla_fwd_o_gk, RCP_LN2)


def test_gla_pieces_of_other_parameters_are_not_used(monkeypatch):
    from fla.ops.gla import chunk

    with looked_up_afresh(fla_chunk.gla_forward, monkeypatch):
        monkeypatch.setattr(chunk, "chunk_gla_fwd_o_gk", lambda q, v, g, A, h, scale: None)
        assert fla_chunk.gla_forward() is None


def test_a_gla_states_kernel_whose_launch_sets_less_is_not_launched(monkeypatch):
    """``chunk_gla`` leaves the tile sizes to the states kernel's autotuner: without one, it is not used."""
    from fla.ops.common import chunk_h
    from triton.runtime.autotuner import Autotuner

    tuner = chunk_h.chunk_fwd_kernel_h
    while not isinstance(tuner, Autotuner):
        tuner = tuner.fn
    with looked_up_afresh(fla_chunk.gla_forward, monkeypatch):
        monkeypatch.setattr(tuner, "configs", [type(c)({"BV": 32}, num_warps=c.num_warps) for c in tuner.configs])
        assert fla_chunk.gla_forward() is None


def test_a_forward_function_of_other_parameters_is_not_used(monkeypatch):
    from fla.ops.gated_delta_rule import chunk_fwd

    def chunk_gated_delta_rule_fwd_intra(k, v, g, beta, cu_seqlens=None, chunk_size=64):
        raise AssertionError("not to be called")

    with looked_up_afresh(fla_chunk.gated_delta_forward, monkeypatch):
        monkeypatch.setattr(chunk_fwd, "chunk_gated_delta_rule_fwd_intra", chunk_gated_delta_rule_fwd_intra)
        assert fla_chunk.gated_delta_forward() is None
        assert not fla_chunk.direct(torch.zeros(1), fla_chunk.gated_delta_forward)


def test_kda_pieces_of_other_parameters_are_not_used(monkeypatch):
    from fla.ops.common import chunk_delta_h

    with looked_up_afresh(fla_chunk.kda_forward, monkeypatch):
        monkeypatch.setattr(chunk_delta_h, "chunk_gated_delta_rule_fwd_h", lambda k, w, u, g, gk, initial_state: None)
        assert fla_chunk.kda_forward() is None
        assert not fla_chunk.direct(torch.zeros(1), fla_chunk.kda_forward)


@pytest.mark.parametrize("change", ["arguments", "launch"])
def test_a_kda_solve_kernel_of_other_arguments_or_launch_is_not_launched(monkeypatch, change):
    """``chunk_kda`` launches fla's kernel of the scores between blocks and the solve itself, with the arguments it
    names, leaving the key block to the kernel's autotuner: a kernel of other arguments, or whose autotuner does not
    set that block, is not launched."""
    from fla.ops.kda import chunk_intra
    from triton.runtime.autotuner import Autotuner

    tuner = chunk_intra.chunk_kda_fwd_kernel_inter_solve_fused
    while not isinstance(tuner, Autotuner):
        tuner = tuner.fn
    with looked_up_afresh(fla_chunk.kda_forward, monkeypatch):
        if change == "arguments":
            monkeypatch.setattr(fla_chunk, "KDA_SOLVE_ARGUMENTS", fla_chunk.KDA_SOLVE_ARGUMENTS[:-1])
        else:
            monkeypatch.setattr(tuner, "configs", [type(c)({}, num_warps=c.num_warps) for c in tuner.configs])
        assert fla_chunk.kda_forward() is None


def test_the_direct_kda_forward_refuses_an_initial_state_that_is_not_float32():
    """As fla's ``chunk_kda`` does (another dtype would compile other kernels), before any kernel runs."""
    q = torch.zeros(1, 64, 1, 16)
    with pytest.raises(ValueError, match="must be float32"):
        fla_chunk.chunk_kda(q, q, q, q, q[..., 0], initial_state=torch.zeros(1, 1, 16, 16, dtype=torch.bfloat16))


def test_the_direct_forward_is_not_taken_on_cpu_or_under_autograd():
    with torch.no_grad():
        assert not fla_chunk.direct(torch.zeros(1), fla_chunk.gated_delta_forward)
    if torch.cuda.is_available():
        assert not fla_chunk.direct(torch.zeros(1, device="cuda"), fla_chunk.gated_delta_forward)  # grad enabled
        with torch.no_grad():
            assert fla_chunk.direct(torch.zeros(1, device="cuda"), fla_chunk.gated_delta_forward)


DIRECT_FORWARDS_INTERPRETED = """
import torch
from fla.ops.delta_rule import chunk_delta_rule
from fla.ops.gated_delta_rule import chunk_gated_delta_rule
from fla.ops.gla import chunk_gla
from fla.ops.kda import chunk_kda

from compressor.modeling import fla_chunk
from compressor.modeling.channel_gate import chunk_cumulative
from compressor.modeling.delta_rule import recurrent_delta_rule_torch
from compressor.modeling.gated_delta import recurrent_gated_delta_rule_torch, summed_chunk
from compressor.modeling.gla import recurrent_gla_torch
from compressor.modeling.kda import naive_recurrent_kda
from compressor.modeling.packed_heads import sequence_index
from triton_interpreter import run_fla_chunked_kernels

run_fla_chunked_kernels()
generator = torch.Generator().manual_seed(0)
count, length, width, value_width = 2, 70, 32, 16  # each sequence one whole chunk and part of another; the
# second starts inside a chunk of the packed tokens
tokens = count * length
q, k = (torch.nn.functional.normalize(torch.randn(1, tokens, 1, width, generator=generator), dim=-1) for _ in "qk")
v = torch.randn(1, tokens, 1, value_width, generator=generator)
beta = torch.rand(1, tokens, 1, generator=generator)
g = -0.1 * torch.rand(1, tokens, 1, generator=generator)  # log decay per token (the gated delta rule)
g_channels = torch.nn.functional.logsigmoid(torch.randn(1, tokens, 1, width, generator=generator)) / 4  # KDA's, GLA's
state = 0.1 * torch.randn(count, 1, width, value_width, generator=generator)
index = sequence_index(count, length, q.device)
scale = 0.15  # not 32^-0.5: a layer whose query/key channels were cut (the calls without states take the default)
packed = dict(initial_state=state, output_final_state=True, cu_seqlens=index["cu_seqlens"], scale=scale)
chunks = dict(chunk_indices=index["chunk_indices"])
# (direct forward, fla's public function, PyTorch reference, the gates they take), by the name the test gives
forwards = dict(
    gated_delta=(summed_chunk, chunk_gated_delta_rule, recurrent_gated_delta_rule_torch, (g,)),  # from g's sums
    delta=(fla_chunk.chunk_delta_rule, chunk_delta_rule, recurrent_delta_rule_torch, ()),
    kda=(fla_chunk.chunk_kda, chunk_kda, naive_recurrent_kda, (g_channels,)),
    gla=(fla_chunk.chunk_gla, chunk_gla, recurrent_gla_torch, (g_channels,)),
)
for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
    qd, kd, vd, bd = (x.to(dtype) for x in (q, k, v, beta))
    for direct, public, reference, gates in (forwards[name] for name in NAMES):
        delta = reference is not recurrent_gla_torch
        arguments = (qd, kd, vd, *gates, *(bd,) * delta)
        extra = {chunk_gla: dict(chunk_offsets=index["chunk_offsets"])}.get(public, {})  # what the layers pass besides
        as_batch = public is not chunk_gla
        if as_batch:  # a batch of the sequences; KDA's from the decay's chunk-local sums in base 2
            batch = [x.view(count, length, *x.shape[2:]) for x in arguments]
            if public is chunk_kda:
                batch[3] = chunk_cumulative(batch[3])
            out, final = direct(*batch, initial_state=state, output_final_state=True, scale=scale)
            out = out.view(1, tokens, 1, -1)
        else:
            out, final = direct(*arguments, **packed, **chunks, **extra)
        if public is not chunk_delta_rule or dtype != torch.float32:  # fla's delta rule refuses float32
            expected = public(*arguments, **packed)
            assert torch.equal(out, expected[0]) and torch.equal(final, expected[1]), (direct.__name__, dtype)
        if public is chunk_kda and dtype == torch.float32:  # once: KDA's kernels run slowly here
            value_first = direct(*(x[1:] for x in batch), initial_state=state[1:].transpose(-1, -2).contiguous(),
                                 output_final_state=True, scale=scale, state_v_first=True)  # fla's KDA cache layout
            assert torch.equal(value_first[0].view(1, length, 1, -1), out[:, length:])  # the second sequence's
            assert torch.equal(value_first[1], final[1:].transpose(-1, -2))
            stateless = direct(*batch, scale=scale)
            expected = public(*arguments, cu_seqlens=index["cu_seqlens"], scale=scale)
            assert torch.equal(stateless[0].view(expected[0].shape), expected[0]) and stateless[1] is None
        elif public is not chunk_kda and (public is not chunk_delta_rule or dtype != torch.float32):
            stateless = direct(*batch) if as_batch else direct(*arguments, cu_seqlens=index["cu_seqlens"], **chunks,
                                                                **extra)
            expected = public(*arguments, cu_seqlens=index["cu_seqlens"])
            assert torch.equal(stateless[0].view(expected[0].shape), expected[0]) and stateless[1] is None, (
                direct.__name__, dtype)
        for sequence in range(count):
            part = slice(sequence * length, (sequence + 1) * length)
            expected = reference(*(x[:, part] for x in arguments), initial_state=state[sequence:sequence + 1],
                                 output_final_state=True, scale=scale)
            assert (out[:, part].float() - expected[0].float()).abs().max() < tolerance, (direct.__name__, dtype)
            assert (final[sequence:sequence + 1] - expected[1]).abs().max() < tolerance, (direct.__name__, dtype)
print("ok")
"""


DIAGONAL_BLOCKS_INTERPRETED = """
from fla.ops.kda.chunk_intra_token_parallel import chunk_kda_fwd_intra_token_parallel
from compressor.modeling.kda_diagonal import BLOCK, diagonal_blocks

for batch, length, width, dtype, heads in ((3, 37, 24, torch.bfloat16, 1), (1, 70, 32, torch.float32, 1),
                                            (3, 37, 24, torch.bfloat16, 2)):  # 2 value heads share each key head
    q, k = (torch.nn.functional.normalize(torch.randn(batch, length, 1, width, generator=generator), dim=-1).to(dtype)
            for _ in "qk")
    decay = torch.nn.functional.logsigmoid(torch.randn(batch, length, heads, width, generator=generator)) / 4
    g = chunk_cumulative(decay).contiguous()  # the chunk-local sums in base 2, as the chunked forward reads them
    beta = torch.rand(batch, length, heads, generator=generator).to(dtype)
    written = {}
    for name, write in (("fla", lambda *scores: chunk_kda_fwd_intra_token_parallel(
                            q=q, k=k, gk=g, beta=beta, Aqk=scores[0], Akk=scores[1], scale=0.3, chunk_size=64,
                            sub_chunk_size=BLOCK)),
                        ("ours", lambda *scores: diagonal_blocks(q, k, g, beta, 0.3, *scores))):
        scores = (torch.full((batch, length, heads, 64), float("nan"), dtype=dtype),
                  torch.full((batch, length, heads, BLOCK), float("nan")))  # what is not written stays NaN
        write(*scores)
        written[name] = scores
    for ours, fla in zip(written["ours"], written["fla"]):
        torch.testing.assert_close(ours, fla, rtol=0, atol=0, equal_nan=True)
        assert ours.isnan().float().mean() < 0.9  # something was written
"""


@pytest.mark.parametrize("names", [("gated_delta", "delta", "gla"), pytest.param(("kda",), marks=pytest.mark.slow)],
                         ids=["delta-rules-and-gla", "kda"])
def test_the_direct_forwards_run_fla_kernels_as_its_public_functions_do(names):
    """The direct forwards on CPU tensors under Triton's interpreter, in float32 and bfloat16, d_k 32 and d_v 16:
    each equals fla's public function bit for bit, with initial and final states at a query scale other than
    d_k^-0.5, and without them at the default one (DeltaNet's refuses float32; all but GLA's take the sequences as
    a batch, the gated rules from their decay's chunk-local sums, which the gated delta rule's recurrence takes
    itself, ``gated_delta.summed_chunk``; KDA's without states in float32 only: its kernels run slowly here, outside
    the fast subset), and the PyTorch reference (to bfloat16's rounding) on each packed sequence.

    With KDA, its diagonal blocks of the intra-chunk scores (``kda_diagonal.py``) against fla's token-parallel kernel
    on the same batch of one-head entries: bit for bit, and the same entries written (the rest left as they were);
    a batch of more entries than a program takes and not a multiple of them, a length that ends inside a block and
    one that crosses a chunk, key widths that are not powers of two, bf16 and float32. A wrong row, column or offset
    moves values by O(1) or writes another entry."""
    pytest.importorskip("fla.ops.kda")
    skip_where_the_interpreter_fails_on("fla's chunked kernels")
    script = DIRECT_FORWARDS_INTERPRETED
    if "kda" in names:
        script = script.replace('print("ok")', DIAGONAL_BLOCKS_INTERPRETED + 'print("ok")')
    run_interpreted(f"NAMES = {names!r}\n" + script)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's chunked kernels run on CUDA tensors")
@pytest.mark.parametrize("rule", ["gated-delta-rule", "delta-rule", "kda"])
def test_the_direct_forward_equals_fla_public_function(rule):
    """6 sequences of 200 tokens (not a whole number of chunks), an initial state, bf16, a query scale other than
    d_k^-0.5, against fla's public function on them packed. The direct forwards take them as a batch (the gated rules
    from their decay's chunk-local sums in base 2, which ``gated_delta.summed_chunk`` takes itself, KDA's computing
    its states value-first), so other variants of fla's kernels, tuned on their own, run: within 2 % of the largest
    value, with and without states (a wrong slice moves values by their own size; the interpreted test above checks
    them bit for bit against the public function)."""
    from fla.ops.delta_rule import chunk_delta_rule
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from fla.ops.kda import chunk_kda

    from compressor.modeling.gated_delta import summed_chunk

    generator = torch.Generator(device="cuda").manual_seed(0)
    count, length, width = 6, 200, 128
    tokens = count * length

    def random(*shape):
        return torch.randn(*shape, device="cuda", generator=generator)

    q, k = (torch.nn.functional.normalize(random(1, tokens, 1, width), dim=-1).to(torch.bfloat16) for _ in "qk")
    v = random(1, tokens, 1, width).to(torch.bfloat16)
    beta = random(1, tokens, 1).sigmoid().to(torch.bfloat16)
    gates = {"gated-delta-rule": dict(g=-torch.rand(1, tokens, 1, device="cuda", generator=generator) * 0.1),
             "delta-rule": {},
             "kda": dict(g=torch.nn.functional.logsigmoid(random(1, tokens, 1, width)) / 16)}[rule]
    state = random(count, 1, width, width) * 0.1
    index = sequence_index(count, length, q.device)
    inputs = dict(q=q, k=k, v=v, beta=beta, scale=0.05, **gates)
    public, direct = {"gated-delta-rule": (chunk_gated_delta_rule, summed_chunk),
                      "delta-rule": (chunk_delta_rule, fla_chunk.chunk_delta_rule),
                      "kda": (chunk_kda, fla_chunk.chunk_kda)}[rule]
    with torch.no_grad():
        expected = public(**inputs, initial_state=state, output_final_state=True, cu_seqlens=index["cu_seqlens"])
        # a batch of the sequences; KDA's from the decay's chunk-local sums in base 2 (the gated delta rule's
        # recurrence takes them itself)
        batch = {name: x.view(count, length, *x.shape[2:]) for name, x in inputs.items() if name != "scale"}
        if rule == "kda":
            batch["g"] = chunk_cumulative(batch["g"])
        got = direct(**batch, scale=inputs["scale"], initial_state=state, output_final_state=True)
        got = (got[0].view(expected[0].shape), got[1])
    assert got[0].dtype == expected[0].dtype
    for a, b in zip(got, expected):  # other variants of the kernels (no sequence boundaries), tuned on their own
        assert (a.float() - b.float()).abs().max() <= 2e-2 * b.float().abs().max()
    with torch.no_grad():  # the prefill of a model without a cache: no states
        expected = public(**inputs, cu_seqlens=index["cu_seqlens"])
        stateless = direct(**batch, scale=inputs["scale"])
    assert stateless[1] is None
    assert (stateless[0].view(expected[0].shape).float() - expected[0].float()).abs().max() <= (
        2e-2 * expected[0].float().abs().max())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's chunked kernels run on CUDA tensors")
def test_the_direct_gla_forward_equals_fla_public_function():
    """GLA's per-channel decay on packed heads (5 of 130 tokens), an initial state, bf16, a query scale other than
    d_k^-0.5; the number of chunks from the host instead of the GPU."""
    from fla.ops.gla import chunk_gla

    generator = torch.Generator(device="cuda").manual_seed(1)
    count, length, width = 5, 130, 128
    tokens = count * length
    q, k, v = (torch.randn(1, tokens, 1, width, device="cuda", generator=generator).to(torch.bfloat16)
               for _ in "qkv")
    g = torch.nn.functional.logsigmoid(torch.randn(1, tokens, 1, width, device="cuda", generator=generator)) / 16
    state = torch.randn(count, 1, width, width, device="cuda", generator=generator) * 0.1
    index = sequence_index(count, length, q.device)
    with torch.no_grad():
        expected = chunk_gla(q=q, k=k, v=v, g=g, scale=0.05, initial_state=state, output_final_state=True,
                             cu_seqlens=index["cu_seqlens"])
        got = fla_chunk.chunk_gla(q=q, k=k, v=v, g=g, scale=0.05, initial_state=state, output_final_state=True,
                                  cu_seqlens=index["cu_seqlens"], chunk_indices=index["chunk_indices"],
                                  chunk_offsets=index["chunk_offsets"])
    assert got[0].dtype == expected[0].dtype and torch.equal(got[0], expected[0])
    assert torch.equal(got[1], expected[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's gated norm runs on CUDA tensors")
def test_the_routed_gated_norm_on_cuda_equals_fla_module():
    """fla families' gated output norm, launched once on its rows outside autograd, against fla's own module."""
    from fla.modules import FusedRMSNormGated

    from compressor.modeling.fla_layers import TorchRoutedFusedRMSNormGated

    stock = FusedRMSNormGated(128, eps=1e-5).cuda().to(torch.bfloat16)
    torch.nn.init.normal_(stock.weight)
    routed = FusedRMSNormGated(128, eps=1e-5).cuda().to(torch.bfloat16)
    routed.load_state_dict(stock.state_dict())
    routed.__class__ = TorchRoutedFusedRMSNormGated
    x = torch.randn(2, 300, 8, 128, device="cuda").to(torch.bfloat16).transpose(1, 2).contiguous().transpose(1, 2)
    gate = torch.randn(2, 300, 8, 128, device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        got, expected = routed(x, gate), stock(x, gate)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's chunked kernels run on CUDA tensors")
@pytest.mark.parametrize("name, module, attribute", [("gated_deltanet_gva", "gated_delta", "unwrapped_chunk"),
                                                     ("delta_net", "delta_rule", "unwrapped_chunk"),
                                                     ("kda_gva", "kda", "unwrapped_chunk"),
                                                     ("gla", "gla", "unwrapped_chunk")])
def test_a_prefill_on_cuda_takes_the_direct_forward_outside_autograd_only(monkeypatch, name, module, attribute):
    import importlib

    from tiny_fla import input_ids, tiny_fla_model

    recurrences = importlib.import_module(f"compressor.modeling.{module}")
    calls = []
    direct_forward = getattr(recurrences, attribute)

    def spy(*args, **kwargs):
        calls.append(1)
        return direct_forward(*args, **kwargs)

    monkeypatch.setattr(recurrences, attribute, spy)
    model = tiny_fla_model(name).cuda().to(torch.bfloat16)
    ids = input_ids().cuda()
    with torch.no_grad():
        model(ids)
    assert len(calls) == model.config.num_hidden_layers
    model(ids)  # under autograd: fla's public function
    assert len(calls) == model.config.num_hidden_layers


@pytest.mark.parametrize("rule, limit, strided, taken", [("gated-delta-rule", 6, False, "direct"),
                                                         ("gated-delta-rule", 5, False, "public"),
                                                         ("delta-rule", 6, False, "direct"),
                                                         ("delta-rule", 5, False, "public"),
                                                         ("kda", 6, False, "direct"), ("kda", 5, False, "public"),
                                                         ("kda", 6, True, "public"), ("kda-gate", 6, False, "direct"),
                                                         ("kda-gate", 5, False, "public")])
def test_a_prefill_of_more_heads_than_a_grid_holds_takes_flas_public_function(monkeypatch, rule, limit, strided, taken):
    """The delta rules' and KDA's chunked forwards on the CUDA path outside autograd run their B·H heads as batch
    entries, which fla's kernels put in a grid dimension CUDA caps (``MAX_BATCH_ENTRIES``); beyond it, or for a KDA
    decay whose channels are not adjacent (which ``chunk_cumulative`` does not read), fla's public function with
    every head a packed sequence. The gated delta rule hands its direct forward the decay's chunk sums and fla's
    public function the decay. Handed the gate's input and parameters instead of the decay, KDA's recurrence sums
    the gate in its own launch on the direct path, and elsewhere hands fla the decay the gate computes, never the
    input. Here B·H = 6, the kernels stand-ins that record the batch and the decay they were handed."""
    from compressor.modeling import delta_rule, gated_delta, kda
    from compressor.modeling.channel_gate import DecayGate

    module = {"gated-delta-rule": gated_delta, "delta-rule": delta_rule, "kda": kda, "kda-gate": kda}[rule]
    calls, decays, gates = [], [], []

    def kernel(name):
        return lambda **arguments: (calls.append((name, arguments["v"].shape)) or decays.append(arguments.get("g"))
                                    or (arguments["v"], None))

    monkeypatch.setattr(module, "HAS_FLA", True)
    monkeypatch.setattr(module, "MAX_BATCH_ENTRIES", limit)
    monkeypatch.setattr(module, "unwrapped_chunk", kernel("direct"))
    monkeypatch.setattr(module, "_fla_chunk", kernel("public"))
    q, k, v = (torch.randn(2, 70, 3, 8).to(torch.bfloat16) for _ in "qkv")
    beta = torch.rand(2, 70, 3).to(torch.bfloat16)
    if rule.startswith("kda"):
        monkeypatch.setattr(kda, "kda_forward", lambda: ())
        monkeypatch.setattr(kda, "normalised_pair", lambda q, k: (q, k))
        monkeypatch.setattr(kda, "chunk_cumulative", lambda g: g)
        monkeypatch.setattr(kda, "channel_gate_runs", lambda x, width: True)
        monkeypatch.setattr(kda, "channel_gate", lambda f, *gate: gates.append("gate") or f + 1)
        monkeypatch.setattr(kda, "gated_chunk_cumulative", lambda f, gate: gates.append("gate and sums") or f + 2)
        g = torch.zeros(2, 70, 3, 8) if rule == "kda-gate" else -torch.rand(2, 70, 3, 8)
        if strided:
            g = g.transpose(-1, -2).contiguous().transpose(-1, -2)
        gate = {"decay_gate": DecayGate(torch.zeros(3, 8), torch.ones(3), None)} if rule == "kda-gate" else {}
        recurrence = lambda: kda.kimi_delta_attention(q, k, v, g, beta, **gate)  # noqa: E731
    elif rule == "gated-delta-rule":
        monkeypatch.setattr(gated_delta, "gated_delta_forward", lambda: ())
        monkeypatch.setattr(gated_delta, "channel_gate_runs", lambda x, width: True)
        monkeypatch.setattr(gated_delta, "chunk_cumulative", lambda g: g + 2)  # the sums' stand-in
        g = -torch.rand(2, 70, 3)
        recurrence = lambda: gated_delta.gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=False)  # noqa: E731
    else:
        monkeypatch.setattr(delta_rule, "delta_forward", lambda: ())
        recurrence = lambda: delta_rule.delta_rule(q, k, v, beta, use_qk_l2norm=False)  # noqa: E731
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with torch.no_grad():
        out, _ = recurrence()
    monkeypatch.undo()
    assert calls == [(taken, (6, 70, 1, 8) if taken == "direct" else (1, 420, 1, 8))]
    assert torch.equal(out, v)
    if rule == "kda-gate":
        assert gates == ["gate and sums" if taken == "direct" else "gate"]
        assert (decays[0] == (2 if taken == "direct" else 1)).all()  # the decay (or its sums), not the gate's input
    if rule == "gated-delta-rule":
        handed = g.transpose(1, 2).reshape(6, 70, 1)
        assert torch.equal(decays[0], handed + 2 if taken == "direct" else handed.view(1, 420, 1))


@pytest.mark.parametrize("limit, ratio", [(12, 2), (11, 1)])
def test_value_heads_that_share_key_heads_count_every_value_head_against_the_grid_limit(monkeypatch, limit, ratio):
    """fla's gated-delta kernels put batch x value heads in a grid dimension CUDA caps (``MAX_BATCH_ENTRIES``), also
    where value heads share key heads and an entry holds one key head: a grouped layer (3 key over 6 value heads) takes
    fla's layout for them up to that count (a batch of 2: 12), and the packed heads of the public function beyond;
    the chunk sums' kernel is asked for its 2 value heads per entry as channels."""
    from tiny_fla import tiny_fla_model

    from compressor.families import family_for
    from compressor.layers import linear_layers
    from compressor.modeling import gated_delta

    model = tiny_fla_model("gated_deltanet_gva")
    mixer = linear_layers(model, family_for(model.config))[0]
    monkeypatch.setattr(gated_delta, "MAX_BATCH_ENTRIES", limit)
    monkeypatch.setattr(gated_delta, "gated_delta_forward", lambda: ())
    widths = []  # the channels the chunk sums take: an entry's value heads
    monkeypatch.setattr(gated_delta, "channel_gate_runs", lambda x, width: widths.append(width) or True)
    monkeypatch.setattr(type(mixer), "convolves_heads", lambda self, projection: True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with torch.no_grad():
        a = torch.zeros(2, 70, 6)
        got = mixer.shared_key_ratio(a, a)
    monkeypatch.undo()
    assert got == ratio and widths == [2]
