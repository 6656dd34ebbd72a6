"""The output norm read through strides (``head_norm.py``): the recurrence's head-major output normalised, gated and
written in token order in one launch, as fla's norm kernels compute it."""

from __future__ import annotations

import pytest
import torch
from hopper import hopper_loads
from triton_interpreter import run_interpreted

HEAD_NORM_INTERPRETED = """
import torch
import torch.nn.functional as F
from compressor.modeling.head_norm import rms_normalised

generator = torch.Generator().manual_seed(0)
for width, dtype in ((128, torch.float32), (20, torch.bfloat16)):  # 20: the kernel pads the row to 32
    out = torch.randn(2, 3, 7, width, generator=generator).to(dtype)  # head-major [B, H, T, D]
    x = out.transpose(1, 2)  # [B, T, H, D] as the recurrence returns it
    x[0, 0, 0] *= 1e-3  # rms² near eps: another eps would show
    z = torch.randn(2, 7, 5 * width, generator=generator).to(dtype)[..., width:4 * width]  # a slice of a projection
    gate = z.reshape(2, 7, 3, width)
    weight = torch.randn(width, generator=generator)
    rows = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    for activation, expected in ((None, rows), ("silu", rows * F.silu(gate.float())),
                                 ("swish", rows * F.silu(gate.float())), ("sigmoid", rows * torch.sigmoid(gate.float()))):
        got = rms_normalised(x, weight, 1e-6, None if activation is None else gate, activation)
        assert got.is_contiguous() and got.shape == x.shape and got.dtype == dtype, activation
        error = ((got.float() - expected).abs() / (expected.abs() + 1e-3)).max().item()
        assert error < (1e-5 if dtype == torch.float32 else 2**-7), (width, activation, error)
    # 2 key heads of r = 3 value heads each, as fla lays them out ([B, H_k, T, r, D] memory), a gate token-major
    x = torch.randn(2, 2, 7, 3, width, generator=generator).to(dtype).transpose(1, 2)  # [B, T, H_k, r, D]
    gate = torch.randn(2, 7, 2, 3, width, generator=generator).to(dtype)
    heads = x.float().reshape(2, 7, 6, width)  # value head h = i·r + j, in token order
    expected = (heads * torch.rsqrt(heads.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
                * F.silu(gate.float().reshape(2, 7, 6, width)))
    got = rms_normalised(x, weight, 1e-6, gate, "silu")
    assert got.shape == x.shape and got.is_contiguous()
    error = ((got.float().reshape(expected.shape) - expected).abs() / (expected.abs() + 1e-3)).max().item()
    assert error < (1e-5 if dtype == torch.float32 else 2**-7), (width, error)
assert rms_normalised(torch.empty(2, 0, 3, 8), torch.ones(8), 1e-6).shape == (2, 0, 3, 8)
print("ok")
"""


def test_the_head_norm_kernel_equals_pytorch_on_head_major_rows_and_a_strided_gate():
    """``head_norm.py``'s kernel run by Triton's interpreter: head-major rows (as the recurrence returns them), a gate
    sliced from a wider projection, rows whose count is not a multiple of its block, a row size that is not a power of
    two, every activation and none, float32 and bfloat16. A wrong stride, row order or gate moves the values by
    O(1); another eps shows on the row whose mean square is near it."""
    pytest.importorskip("triton")
    run_interpreted(HEAD_NORM_INTERPRETED)


def test_the_head_norm_takes_head_major_gpu_rows_outside_autograd_only(monkeypatch):
    """Contiguous rows stay with fla's kernels, which read them as they lie; rows without a contiguous last
    dimension, wider rows, other ranks and autograd go elsewhere too."""
    from compressor.modeling import head_norm

    pytest.importorskip("triton")
    x = torch.randn(2, 3, 5, 8).transpose(1, 2)  # [B, T, H, D], head-major
    assert not head_norm.takes(x)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with torch.no_grad():
        assert head_norm.takes(x) and head_norm.takes(x, torch.randn(2, 5, 3, 8))
        assert not head_norm.takes(x.contiguous()) and not head_norm.takes(x[..., ::2])
        assert not head_norm.takes(x, torch.randn(2, 5, 3, 16)[..., ::2]) and not head_norm.takes(x[0])
        assert not head_norm.takes(torch.randn(2, 3, 5, 1024).transpose(1, 2))
    with torch.enable_grad():
        assert not head_norm.takes(x)


@pytest.mark.parametrize("case", ["strided rows", "other gate", "activation", "weight"])
def test_the_head_norm_refuses_what_its_kernel_would_misread(case):
    from compressor.modeling.head_norm import rms_normalised

    x, gate, weight, activation = torch.randn(2, 5, 3, 8), torch.randn(2, 5, 3, 8), torch.randn(8), "silu"
    if case == "strided rows":
        x = torch.randn(2, 5, 3, 16)[..., ::2]
    elif case == "other gate":
        gate = gate[:, :4]
    elif case == "activation":
        activation = "gelu"
    else:
        weight = torch.randn(16)[::2]
    with pytest.raises(ValueError, match="rms_normalised takes"):
        rms_normalised(x, weight, 1e-6, gate, activation)


@pytest.mark.parametrize("activation", ["", "silu"])
def test_the_head_norm_kernel_compiles_for_an_h100_with_vector_loads(activation):
    """The kernel compiled for sm_90 as the shipped code launches it: rows of 128 loaded 16 bytes at a time, x's and
    the gate's as well as the weight's (no load of fewer bytes)."""
    pytest.importorskip("triton")
    from compressor.modeling.fla_rows import GATED_NORM_CONFIG
    from compressor.modeling.head_norm import head_norm_kernel

    types = dict(x="*bf16", g="*bf16", w="*fp32", y="*bf16", eps="fp32", N="i32", T="i32", H="i32", R="i32",
                 **{name: "i32" for name in ("sx_b", "sx_t", "sx_h", "sx_r", "sg_b", "sg_t", "sg_h", "sg_r")})
    loads = hopper_loads(head_norm_kernel, types, {"D": 128, "BD": 128, "BR": GATED_NORM_CONFIG["BT"],
                                                   "ACTIVATION": activation}, GATED_NORM_CONFIG["num_warps"])
    assert loads == {"ld.global.v4.b32"}, loads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("activation", ["swish", "sigmoid", None])
def test_the_head_norm_on_cuda_equals_fla_on_copied_rows(activation):
    """The kernel compiled for a GPU against fla's own norm modules on the same rows copied into token order."""
    pytest.importorskip("fla")
    from fla.modules import FusedRMSNormGated, RMSNorm

    from compressor.modeling.head_norm import rms_normalised

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, 300, 128, generator=generator).to(torch.bfloat16).cuda().transpose(1, 2)
    gate = torch.randn(4, 300, 16 * 128, generator=generator).to(torch.bfloat16).cuda().view(4, 300, 16, 128)
    norm = (RMSNorm(128) if activation is None else FusedRMSNormGated(128, activation=activation)).cuda()
    torch.nn.init.normal_(norm.weight)
    with torch.no_grad():
        got = rms_normalised(x, norm.weight, norm.eps, None if activation is None else gate, activation)
        expected = norm(x.contiguous()) if activation is None else norm(x.contiguous(), gate)
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_head_norm_on_cuda_reads_and_writes_past_two_to_the_31st_element():
    """Offsets in 64 bits: the last rows of a head-major input lie past element 2³¹, as do their normalised copies in
    token order (4.3 GB in, 4.3 GB out, on the GPU)."""
    pytest.importorskip("triton")
    from compressor.modeling.head_norm import rms_normalised

    length = 2**31 // (2 * 128) + 64
    x = torch.empty(1, 2, length, 128, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
    x[0, -64:] = torch.randn(64, 2, 128, device="cuda").to(torch.bfloat16)
    weight = torch.randn(128, device="cuda")
    got = rms_normalised(x, weight, 1e-6)
    assert got[0, -64:].data_ptr() - got.data_ptr() >= 2**31 * got.element_size()  # int32 offsets stop at 2³¹ - 1
    rows = x[0, -64:].float()
    expected = rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    torch.testing.assert_close(got[0, -64:], expected.to(torch.bfloat16), rtol=1e-2, atol=1e-2)


def test_the_head_norm_refuses_more_rows_than_its_int32_count_holds(monkeypatch):
    """The kernel counts rows in int32: ``takes`` declines 2**31 rows and ``rms_normalised`` refuses them (meta
    tensors: no memory)."""
    pytest.importorskip("triton")
    from compressor.modeling import head_norm

    x = torch.empty(2, 2**30, 1, 8, device="meta").transpose(0, 1)  # head-major rows, as a recurrence leaves them
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with torch.no_grad():
        assert head_norm.takes(x[: 2**29]) and not head_norm.takes(x)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="fewer than"):
        head_norm.rms_normalised(x, torch.ones(8, device="meta"), 1e-6)
