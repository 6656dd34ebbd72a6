"""Calibration's view into the recurrences: while calibrating, each linear-attention mixer's recurrence also
returns its state after every 64-token chunk and hands it to a sink. Not shipped: the output folders' modeling code
knows nothing of it.

Every mixer calls its recurrence as ``self.recurrence`` (a class attribute: the inference dispatcher of
``compressor/modeling``); :func:`states_handed_to` puts, on each mixer instance, a wrapper that runs the same
recurrence with its chunk states instead, in strict float32 (float64 for a float64 model on the CPU): the PyTorch
chunked recurrence with TF32 off, or, for the gated delta rule on CUDA, fla's chunked kernels step by step on
float32 inputs with float32-accurate dot products. bf16 intermediates would add noise of about 1e-3 of a state's
scale, which swamps the singular values that a threshold rank at eps = 1e-4 counts (docs/benchmarks.md gives the
agreement measured with each precision).

Shapes: q, k [B, T, H, K]; v [B, T, H, V]; chunk states [B, H, N, K, V] float32 (float64 as above; N = ceil(T / 64),
the last one after token T), or [B, H, n, K, V] for a ``chunk_index`` of n chunks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .modeling import gated_delta
from .modeling.delta_rule import chunk_delta_rule_torch, delta_rule
from .modeling.gated_delta import chunk_gated_delta_rule_torch, gated_delta_rule
from .modeling.gla import chunk_gla_torch, gla
from .modeling.kda import chunk_kda_torch, kimi_delta_attention, swapped

try:  # fla's chunked forward, step by step, to read the chunk states it computes (private API of fla 0.6)
    import triton as _triton
    from fla.modules.norm.l2norm import l2norm_fwd as _fla_l2norm
    from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_h as _fla_fwd_h
    from fla.ops.common.chunk_o import chunk_fwd_o as _fla_fwd_o
    from fla.ops.gated_delta_rule.chunk_fwd import chunk_gated_delta_rule_fwd_intra as _fla_fwd_intra
    from fla.ops.utils import chunk_local_cumsum as _fla_cumsum
    from fla.ops.utils.constant import RCP_LN2 as _RCP_LN2

    HAS_FLA_STATES = gated_delta.HAS_FLA and hasattr(getattr(_triton, "knobs", None), "language")
except Exception:
    HAS_FLA_STATES = False

STATES_DOT_PRECISION = "tf32x3"
"""Triton's precision for float32 dot products while fla computes chunk states: ``tf32x3`` (three TF32 products
per float32 one, float32 accuracy on tensor cores) or ``ieee`` (what each costs and how ranks agree:
docs/benchmarks.md). GPUs without TF32 (before NVIDIA's compute capability 8.0) and AMD GPUs take ``ieee``: see
:func:`states_dot_precision`."""


def states_dot_precision(device: torch.device) -> str:
    """``STATES_DOT_PRECISION`` on an NVIDIA GPU with TF32 (compute capability 8.0 or newer), ``ieee`` otherwise."""
    nvidia_with_tf32 = torch.version.hip is None and torch.cuda.get_device_capability(device) >= (8, 0)
    return STATES_DOT_PRECISION if nvidia_with_tf32 else "ieee"



@contextlib.contextmanager
def strict_float32() -> Iterator[None]:
    """Within the block, CUDA matrix products in float32 are IEEE float32, not TF32."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _selected(result: tuple, chunk_index: torch.Tensor | None) -> tuple:
    out, final, states = result
    return out, final, states if chunk_index is None else states.index_select(2, chunk_index)


def gated_delta_rule_with_states(q, k, v, g, beta, initial_state=None, output_final_state=False, scale=None,
                                 use_qk_l2norm=True, chunk_index=None):
    """:func:`gated_delta_rule` returning ``(o, final state or None, chunk states)``."""
    if q.is_cuda and HAS_FLA_STATES:
        return chunk_gated_delta_rule_fla_states(q, k, v, g, beta, initial_state=initial_state,
                                                 output_final_state=output_final_state, scale=scale,
                                                 use_qk_l2norm=use_qk_l2norm, chunk_index=chunk_index)
    with strict_float32():
        return _selected(chunk_gated_delta_rule_torch(
            q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm, return_chunk_states=True), chunk_index)


def delta_rule_with_states(q, k, v, beta, use_qk_l2norm, initial_state=None, output_final_state=False, scale=None,
                           chunk_index=None):
    """:func:`delta_rule` returning ``(o, final state or None, chunk states)``."""
    with strict_float32():
        return _selected(chunk_delta_rule_torch(
            q, k, v, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm, return_chunk_states=True), chunk_index)


def gla_with_states(q, k, v, gk, initial_state=None, output_final_state=False, scale=None, chunk_index=None):
    """:func:`gla` returning ``(o, final state or None, chunk states)``."""
    with strict_float32():
        return _selected(chunk_gla_torch(q, k, v, gk, scale=scale, initial_state=initial_state,
                                         output_final_state=output_final_state, return_chunk_states=True), chunk_index)


def kda_with_states(q, k, v, g, beta, initial_state=None, output_final_state=False, scale=None, use_qk_l2norm=True,
                    state_v_first=False, chunk_index=None):
    """:func:`kimi_delta_attention` returning ``(o, final state or None, chunk states)``: the initial and final states
    in the caller's layout (value-first with ``state_v_first``), the chunk states key-first."""
    with strict_float32():
        out, final, states = _selected(chunk_kda_torch(
            q, k, v, g, beta, scale=scale, initial_state=swapped(initial_state, state_v_first),
            output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm, return_chunk_states=True),
            chunk_index)
    return out, swapped(final, state_v_first), states


WITH_STATES: dict[Callable, Callable] = {
    gated_delta_rule: gated_delta_rule_with_states,
    delta_rule: delta_rule_with_states,
    gla: gla_with_states,
    kimi_delta_attention: kda_with_states,
}
"""Each shipped recurrence (a mixer class's ``recurrence``) -> its calibration form."""


@contextlib.contextmanager
def states_handed_to(sink: Callable[[int, torch.Tensor], None], mixers: dict[int, nn.Module]) -> Iterator[None]:
    """Within the block, every mixer of ``mixers`` (layer index -> mixer) hands its chunk states to ``sink(layer,
    states)`` on each forward pass; a sink with a ``chunk_index`` attribute (LongTensor [n]) gets those chunks'
    states only. No mixer does after the block, whatever happened in it."""
    for layer, mixer in mixers.items():
        mixer.recurrence = _capturing(WITH_STATES[type(mixer).recurrence], layer, sink)
    try:
        yield
    finally:
        for mixer in mixers.values():
            mixer.__dict__.pop("recurrence", None)


def _capturing(with_states: Callable, layer: int, sink: Callable[[int, torch.Tensor], None]) -> Callable:
    def recurrence(*args, **kwargs):
        out, final, states = with_states(*args, chunk_index=getattr(sink, "chunk_index", None), **kwargs)
        sink(layer, states)
        return out, final

    return recurrence


def chunk_gated_delta_rule_fla_states(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    chunk_size: int = 64,
    chunk_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """fla's chunked forward at ``scale`` (None: d_k^-0.5; q/k L2-normalised inside unless ``use_qk_l2norm`` is
    False) on CUDA tensors, with its chunk states in strict float32.

    The inputs are taken in float32 and, while fla computes the states, Triton's float32 dot products run in
    :func:`states_dot_precision` (float32 accuracy, not plain TF32), so the states carry no bf16 rounding or TF32
    noise. The states are the ones the kernel computes for the output, read in the same pass. The output, which is
    rounded to v's dtype, takes Triton's default float32 precision, as fla computes a float32 model's output (TF32
    on NVIDIA GPUs since Ampere): its error, about 5e-4 of a term, is under bf16's rounding (4e-3). (Triton caches
    compiled kernels without their dot precision: in a process that already ran fla on float32 inputs, those
    kernels are reused.) Returns ``(o [B, T, H, V] in v's dtype, final state [B, H, K, V] float32 or None, chunk
    states [B, H, N, K, V] float32)`` (N = ceil(T / chunk_size), the last one after token T); with
    ``chunk_index`` (LongTensor [n] on the device), only those chunks' states, [B, H, n, K, V], gathered without
    copying the others.
    """
    out_dtype = v.dtype
    v, beta = v.float().contiguous(), beta.float().contiguous()
    language = _triton.knobs.language
    previous = language.fp32_default
    language.fp32_default = states_dot_precision(q.device)
    try:  # the L2 norm reads q and k in their own dtype and writes them in float32 (no copy in float32 first)
        q, k = (_fla_l2norm(x.contiguous(), output_dtype=torch.float32)[0] if use_qk_l2norm else x.float().contiguous()
                for x in (q, k))
        g = _fla_cumsum(g.float().contiguous(), chunk_size=chunk_size, scale=_RCP_LN2)
        w, u, _ = _fla_fwd_intra(k=k, v=v, g=g, beta=beta, chunk_size=chunk_size)
        h, v_new, final = _fla_fwd_h(
            k=k, w=w, u=u, g=g, initial_state=None if initial_state is None else initial_state.float().contiguous(),
            output_final_state=True, chunk_size=chunk_size,
        )
    finally:
        language.fp32_default = previous
    out = _fla_fwd_o(q=q, k=k, v=v_new, h=h, g=g, scale=q.shape[-1] ** -0.5 if scale is None else scale,
                     chunk_size=chunk_size)
    # h[:, i] is the state before chunk i: the state after chunk i is h[:, i + 1], after the last one ``final``.
    if chunk_index is None:
        chunk_states = torch.cat([h[:, 1:], final[:, None]], dim=1)
    else:
        last = h.shape[1] - 1
        after = h.index_select(1, (chunk_index + 1).clamp(max=last))
        chunk_states = torch.where((chunk_index == last)[:, None, None, None], final[:, None], after)
    chunk_states = chunk_states.transpose(1, 2)
    return out.to(out_dtype), (final if output_final_state else None), chunk_states
