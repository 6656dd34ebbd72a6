"""fla's row kernels launched directly (``fla_rows.py``), and queries and keys normalised in one call where they tile
one block of memory (``packed_heads.normalised_pair``)."""

from __future__ import annotations

import pytest
import torch
from fla_lookups import looked_up_afresh
from triton_interpreter import run_interpreted

from compressor.modeling import fla_rows
from compressor.modeling.gated_deltanet import PrunableGatedDeltaNetMixin
from compressor.modeling.packed_heads import head_major, normalised, normalised_pair, normalised_pair_by, shared_rows

ROW_KERNELS_THROUGH_FLA = """
import torch
from triton.runtime import autotuner
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNormGated
from compressor.modeling import fla_rows

def no_autotuning(*args, **kwargs):
    raise AssertionError("fla_rows launches its kernels beneath fla's autotuner")

autotuner.Autotuner.run = no_autotuning
generator = torch.Generator().manual_seed(0)
for width in (128, 20):  # 20: the kernels pad the row to 32
    rows = torch.randn(300, width, generator=generator).to(torch.bfloat16)
    got = fla_rows.l2_normalised(rows, 1e-6)
    expected = rows.float() * torch.rsqrt(rows.float().pow(2).sum(-1, keepdim=True) + 1e-6)
    assert got.dtype == torch.bfloat16 and (got.float() - expected).abs().max() <= 2**-8, width
    norm = Qwen3_5RMSNormGated(width, eps=1e-6)
    torch.nn.init.normal_(norm.weight, generator=generator)
    x, gate = 1e-3 * torch.randn(300, width, generator=generator), torch.randn(300, width, generator=generator)
    got = fla_rows.gated_rms_normalised(x, gate, norm.weight.detach(), norm.variance_epsilon, norm.activation)
    assert (got - norm(x, gate)).abs().max() < 1e-5, width  # rms² ≈ 1e-6, as large as eps: another eps would show
assert fla_rows.l2_normalised(torch.empty(0, 16), 1e-6).shape == (0, 16)
print("ok")
"""


def test_the_row_kernels_launched_directly_equal_pytorch_and_the_stock_gated_norm():
    """fla's l2norm and gated norm kernels, launched as the shipped code launches them on CUDA, run on the CPU by
    Triton's interpreter: fla's argument names and the rows' layout as ``fla_rows`` assumes."""
    pytest.importorskip("fla.modules.norm.fused_norm_gate")
    assert fla_rows.l2norm_kernel() is not None and fla_rows.gated_norm_kernel() is not None
    run_interpreted(ROW_KERNELS_THROUGH_FLA)


@pytest.mark.parametrize("lookup", ["l2norm_kernel", "gated_norm_kernel"])
def test_a_row_kernel_of_other_arguments_is_not_launched(monkeypatch, lookup):
    """fla's l2norm and gated norm kernels (beneath their autotuners) are used only with the arguments of the fla
    this code was written for (otherwise the callers compute in PyTorch, or through the stock module)."""
    pytest.importorskip("fla.modules.norm.fused_norm_gate")
    found = getattr(fla_rows, lookup)()
    assert type(found).__name__ == "JITFunction"
    with looked_up_afresh(getattr(fla_rows, lookup), monkeypatch):
        monkeypatch.setattr(found, "arg_names", [*found.arg_names[:-1], "SOMETHING_NEW"])
        assert getattr(fla_rows, lookup)() is None


@pytest.mark.parametrize(("config", "module", "kernel"), [
    ("L2NORM_CONFIG", "fla.modules.norm.l2norm", "l2norm_fwd_kernel"),
    ("GATED_NORM_CONFIG", "fla.modules.norm.fused_norm_gate", "layer_norm_gated_fwd_kernel"),
])
def test_the_row_kernels_launch_with_one_of_the_configurations_fla_tunes_among(config, module, kernel):
    """A configuration is launch keywords (Triton's interpreter drops unknown ones that a GPU would refuse) and one
    of the candidates of fla's autotuner for that kernel."""
    tuner = getattr(pytest.importorskip(module), kernel)
    from triton.runtime.autotuner import Autotuner

    while not isinstance(tuner, Autotuner):  # beneath the heuristics
        tuner = tuner.fn
    chosen = getattr(fla_rows, config)
    assert set(chosen) == {"BT", "num_warps"}
    assert (chosen["BT"], chosen["num_warps"]) in {(c.kwargs["BT"], c.num_warps) for c in tuner.configs}


@pytest.mark.parametrize("part", ["rows", "gate", "weight"])
def test_the_gated_norm_refuses_what_its_kernel_would_misread(part):
    """The kernel reads rows, gates and weight as contiguous memory: a strided one is refused, not misread."""
    tensors = dict(rows=torch.randn(6, 8), gate=torch.randn(6, 8), weight=torch.randn(8))
    tensors[part] = torch.randn(*tensors[part].shape[:-1], 16)[..., ::2]
    with pytest.raises(ValueError, match="contiguous"):
        fla_rows.gated_rms_normalised(tensors["rows"], tensors["gate"], tensors["weight"], 1e-6, "silu")


def mixer_queries_and_keys(batch: int = 2, tokens: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [B, T, 5, 4] as a Gated DeltaNet mixer hands them to its recurrence (one gather, uneven groups)."""
    mixer = PrunableGatedDeltaNetMixin()
    mixer.layer_idx, mixer.num_k_heads, mixer.num_v_heads, mixer.head_k_dim = 0, 3, 5, 4
    mixer.set_value_to_key([2, 0, 0, 1, 2])
    query_key = torch.randn(batch, tokens, 2 * 3 * 4, generator=torch.Generator().manual_seed(5))
    return mixer.queries_and_keys(query_key)


def counted(calls: list) -> callable:
    """A rows normaliser in PyTorch that records the number of rows of every call."""
    def normalise_rows(rows: torch.Tensor, eps: float) -> torch.Tensor:
        assert rows.is_contiguous()
        calls.append(rows.shape[0])
        return (rows * torch.rsqrt((rows * rows).sum(-1, keepdim=True) + eps))
    return normalise_rows


def two_halves_of_one_projection():
    """q, k [B, T, 3, 4] split from one token-major projection [B, T, 2·3·4]: their rows interleave token by token."""
    both = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(8))
    return tuple(part.reshape(2, 7, 3, 4) for part in both.split(12, dim=-1))


def inside_a_larger_block():
    """q, k [4, 4] back to back from the fifth element of their memory: the block starts inside it."""
    memory = torch.randn(40, generator=torch.Generator().manual_seed(9))
    return memory[4:20].view(1, 4, 1, 4), memory[20:36].view(1, 4, 1, 4)


LAYOUTS = {
    "one gather": (mixer_queries_and_keys, 1),
    "inside a larger block": (inside_a_larger_block, 1),
    "one gather, keys first": (lambda: mixer_queries_and_keys()[::-1], 1),
    "two halves of one projection": (two_halves_of_one_projection, 1),
    "one token of one gather": (lambda: tuple(x[:, 3:4] for x in mixer_queries_and_keys()), 2),
    "two tensors": (lambda: (head_major(torch.randn(2, 7, 5, 4)), head_major(torch.randn(2, 7, 5, 4))), 2),
    "one tensor twice": (lambda: (mixer_queries_and_keys()[0],) * 2, 2),
}


@pytest.mark.parametrize("inference", [False, True], ids=["no_grad", "inference_mode"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_queries_and_keys_that_tile_one_block_are_normalised_in_one_call(layout, inference):
    """Every layout gives each tensor's own normalisation, in its layout; the mixers' q and k (and any pair that
    tiles one block row by row) in one call over exactly their rows, found from the layout alone (views made under
    ``torch.inference_mode`` record no base); slices, separate tensors and overlaps in one call each."""
    make, expected_calls = LAYOUTS[layout]
    calls = []
    with torch.inference_mode() if inference else torch.no_grad():
        q, k = make()
        got = normalised_pair_by(counted(calls), q, k)
    assert len(calls) == expected_calls
    assert sum(calls) == (q.numel() + k.numel()) // 4
    for x, y in zip((q, k), got):  # one call: the views q and k are; one each: head-major, as ``normalised_by``
        laid_out = y.stride() == x.stride() if expected_calls == 1 else y.transpose(1, 2).is_contiguous()
        assert y.shape == x.shape and laid_out
        torch.testing.assert_close(y, normalised(x), rtol=0, atol=1e-6)


def test_rows_that_are_not_whole_rows_of_the_block_are_not_shared():
    """Tensors that leave a gap, or whose rows overlap where another leaves a gap (rows that straddle two of the
    block's), are no block."""
    memory = torch.randn(40)
    q, k = memory[:16].view(4, 4), memory[16:32].view(4, 4)
    assert torch.equal(shared_rows(q, k), memory[:32].view(8, 4))
    assert shared_rows(q, memory[20:36].view(4, 4)) is None  # a gap
    overlapping = memory.as_strided((2, 4), (2, 1), 0)  # rows at 0 and 2, then a gap until 8
    assert shared_rows(overlapping, memory.as_strided((2, 4), (4, 1), 8)) is None
    # whole rows a stride of the width apart, and rows that start two elements into one: no gap, no block
    assert shared_rows(memory.as_strided((3, 4), (8, 1), 0), memory.as_strided((2, 4), (4, 1), 2)) is None
    assert shared_rows(q, memory.view(torch.int32)[16:32].view(4, 4)) is None  # the same memory read as integers


def test_the_pair_on_the_cpu_is_pytorchs():
    q, k = mixer_queries_and_keys()
    with torch.no_grad():
        got = normalised_pair(q, k)
    for x, y in zip((q, k), got):
        assert torch.equal(y, normalised(x))


def counting(calls: list, function):
    def counted_call(*args, **kwargs):
        calls.append(args[0].shape)
        return function(*args, **kwargs)
    return counted_call


def test_cuda_shaped_inputs_reach_the_row_kernels_once(monkeypatch):
    """Where the row kernels take the input (on CUDA, outside autograd), queries and keys of one gather reach the
    l2norm kernel in one call, one tensor in one call, and a gated norm the gated norm kernel in one call; a gate the
    kernel does not apply goes to the stock module. (PyTorch stand-ins for the kernels, so that this runs anywhere.)"""
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNormGated

    from compressor.modeling import gated_deltanet, packed_heads

    calls = []
    monkeypatch.setattr(packed_heads, "takes", lambda rows: True)
    monkeypatch.setattr(packed_heads, "l2norm_kernel", lambda: object())
    monkeypatch.setattr(packed_heads, "l2_normalised", counting(calls, counted([])))
    q, k = mixer_queries_and_keys()
    with torch.no_grad():
        pair = normalised_pair(q, k)
        single = normalised(q)
    assert calls == [(2 * q.numel() // 4, 4), (q.numel() // 4, 4)]
    monkeypatch.undo()
    for got, x in zip((*pair, single), (q, k, q)):
        torch.testing.assert_close(got, normalised(x), rtol=0, atol=1e-6)

    norm = Qwen3_5RMSNormGated(4, eps=1e-6)
    torch.nn.init.normal_(norm.weight, generator=torch.Generator().manual_seed(10))
    x, gate = torch.randn(2, 9, 4, generator=torch.Generator().manual_seed(11)).unbind()
    stand_in = lambda rows, gate, weight, eps, activation: norm(rows, gate)  # noqa: E731
    calls = []
    monkeypatch.setattr(gated_deltanet.gated_delta, "HAS_FLA", True)
    monkeypatch.setattr(gated_deltanet, "takes", lambda rows: True)
    monkeypatch.setattr(gated_deltanet, "gated_norm_kernel", lambda: object())
    monkeypatch.setattr(gated_deltanet, "gated_rms_normalised", counting(calls, stand_in))
    with torch.no_grad():
        assert torch.equal(gated_deltanet.gated_rms_norm(norm, x, gate), norm(x, gate))
        norm.activation = "gelu"
        gated_deltanet.gated_rms_norm(norm, x, gate)
    assert calls == [(9, 4)]


def test_a_kernel_that_reads_nb_in_its_body_is_not_launched():
    """Launching with NB = 1 on any number of rows is exact only while NB is an autotuning key and nothing else."""
    from types import SimpleNamespace

    from compressor.modeling.fla_rows import names_nb_once

    def key_only(x, y, NB, BT):
        return x + y

    def reads_it(x, y, NB, BT):
        return x + y * NB

    assert names_nb_once(SimpleNamespace(fn=key_only)) and not names_nb_once(SimpleNamespace(fn=reads_it))


@pytest.mark.parametrize("value_to_key", [[0, 1, 2, 3, 4, 5], [2, 0, 0, 1, 2, 1]], ids=["one-to-one", "gathered"])
def test_fla_mixers_split_queries_and_keys_head_major_into_one_block(value_to_key, monkeypatch):
    """fla's own layers project queries and keys apart; ``heads`` must hand value head j key head
    ``value_to_key[j]``, head-major, in one block that fla's l2norm kernel normalises in one launch: copied into it
    where value head j reads key head j, gathered once otherwise."""
    pytest.importorskip("fla")
    from tiny_fla import tiny_fla_model

    mixer = tiny_fla_model("gated_deltanet_gva").model.layers[0].attn
    mixer.num_heads = 3 if len(set(value_to_key)) == 3 else 6
    mixer.set_value_to_key(value_to_key)
    if mixer.num_heads == 6:
        monkeypatch.setattr(mixer, "gathered_heads", lambda *args: pytest.fail("gathered, not copied"))
    generator = torch.Generator().manual_seed(2)
    q, k = (torch.randn(2, 5, mixer.num_heads * 8, generator=generator) for _ in "qk")
    v = torch.randn(2, 5, 6 * mixer.head_v_dim, generator=generator)
    got_q, got_k, got_v = mixer.heads(q, k, v)
    for got, x in ((got_q, q), (got_k, k)):
        assert torch.equal(got, x.reshape(2, 5, mixer.num_heads, 8)[:, :, value_to_key])
        assert got.transpose(1, 2).is_contiguous()
    assert shared_rows(got_q, got_k) is not None and torch.equal(got_v, v.reshape(2, 5, 6, -1))
