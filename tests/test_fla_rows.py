"""fla's row kernels launched directly (``fla_rows.py``), and queries and keys normalised in one call where they tile
one block of memory (``packed_heads.normalised_pair``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from compressor.modeling import fla_rows
from compressor.modeling.gated_deltanet import PrunableGatedDeltaNetMixin
from compressor.modeling.packed_heads import head_major, normalised, normalised_pair, normalised_pair_by, shared_rows

ROW_KERNELS_THROUGH_FLA = """
import torch
from triton.runtime import autotuner
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNormGated
from compressor.modeling import fla_rows

# No GPU to time the gated norm's configurations on: every one times the same, and the first is taken.
autotuner.Autotuner._bench = lambda self, *args, config, **kwargs: [1.0]
autotuner.Autotuner.check_disk_cache = lambda self, key, configs, bench: bench() or False
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
    result = subprocess.run([sys.executable, "-c", ROW_KERNELS_THROUGH_FLA], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0 and result.stdout.split() == ["ok"], result.stderr[-3000:]


@pytest.mark.parametrize(("lookup", "kind"), [("l2norm_kernel", "JITFunction"), ("gated_norm_kernel", "Heuristics")])
def test_a_row_kernel_of_other_arguments_is_not_launched(monkeypatch, lookup, kind):
    """fla's l2norm kernel (beneath its autotuner) and gated norm kernel (autotuned) are used only with the arguments
    of the fla this code was written for (otherwise the callers compute in PyTorch, or through the stock module)."""
    pytest.importorskip("fla.modules.norm.fused_norm_gate")
    found = getattr(fla_rows, lookup)()
    assert type(found).__name__ == kind
    monkeypatch.setattr(found, "arg_names", [*found.arg_names[:-1], "SOMETHING_NEW"])
    getattr(fla_rows, lookup).cache_clear()
    try:
        assert getattr(fla_rows, lookup)() is None
    finally:
        monkeypatch.undo()
        getattr(fla_rows, lookup).cache_clear()
    assert getattr(fla_rows, lookup)() is found


def mixer_queries_and_keys(batch: int = 2, tokens: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [B, T, 5, 4] as a Gated DeltaNet mixer hands them to its recurrence (one gather, uneven groups)."""
    mixer = PrunableGatedDeltaNetMixin()
    mixer.layer_idx, mixer.num_k_heads, mixer.num_v_heads, mixer.head_k_dim = 0, 3, 5, 4
    mixer.set_value_to_key([2, 0, 0, 1, 2])
    query_key = torch.randn(batch, tokens, 2 * 3 * 4, generator=torch.Generator().manual_seed(5))
    return mixer.queries_and_keys(query_key, query_key.device)


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


LAYOUTS = {
    "one gather": (mixer_queries_and_keys, 1),
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
    assert shared_rows(q, k.to(torch.float64)) is None


def test_the_pair_on_the_cpu_is_pytorchs():
    q, k = mixer_queries_and_keys()
    with torch.no_grad():
        got = normalised_pair(q, k)
    for x, y in zip((q, k), got):
        assert torch.equal(y, normalised(x))
