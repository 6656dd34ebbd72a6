"""fla's chunked forward passes of the (gated) delta rule, KDA and GLA, beneath the wrappers of its public functions.

Shipped inside output folders (imports only torch, ``fla_decode_step``'s launch helper and ``kda_diagonal``; fla is
looked up at the first call). fla's public ``chunk_gated_delta_rule``, ``chunk_delta_rule``, ``chunk_kda`` and
``chunk_gla`` wrap their forward functions in an autograd Function that saves the inputs, a device guard that checks
every argument, dtype casts for autocast, a backend dispatch and argument checks: host time that a small model's
prefill spends in every layer, and that a forward outside autograd on inputs already packed (``packed_heads``:
contiguous, one device) does not need. GLA's forward also reads the number of chunks from the GPU for packed
sequences, where ``chunk_gla`` takes it from the host. ``gated_delta_forward()``,
``delta_forward()``, ``kda_forward()`` and ``gla_forward()`` find fla 0.6's functions where their parameters are the
ones this code passes, else None; ``direct()`` says when the functions below may replace the public ones, which
callers take otherwise.

Shapes: the (gated) delta rules and KDA take S one-head sequences of T tokens as a batch, q, k [S, T, 1, K], v
[S, T, HV, V] (``packed_heads.heads_as_batch``); GLA takes them packed, q, k [1, N, 1, K], v [1, N, 1, V], g
[1, N, 1, K], with ``cu_seqlens`` [S + 1], ``chunk_indices`` [⌈·/64⌉ chunks, 2] and ``chunk_offsets`` [S + 1] from
``packed_heads.sequence_index``; states [S, HV, K, V].
"""

from __future__ import annotations

import importlib
import inspect
from functools import lru_cache

import torch

from .fla_decode_step import launching_on
from .kda_diagonal import BLOCK, diagonal_blocks
from .packed_heads import CHUNK_SIZE

STATES_PARAMETERS = (
    "k", "w", "u", "g", "gk", "initial_state", "output_final_state", "chunk_size", "save_new_value", "state_v_first",
    "cu_seqlens", "cu_seqlens_cpu", "chunk_indices", "chunk_offsets",
)
"""The parameters of fla 0.6's ``chunk_gated_delta_rule_fwd_h`` (the chunk states of the delta rules and KDA), in
order."""

GATED_DELTA_PARAMETERS = {
    ("fla.ops.gated_delta_rule.chunk_fwd", "chunk_gated_delta_rule_fwd_intra"): (
        "k", "v", "g", "beta", "cu_seqlens", "chunk_size", "chunk_indices"),
    ("fla.ops.common.chunk_delta_h", "chunk_gated_delta_rule_fwd_h"): STATES_PARAMETERS,
    ("fla.ops.common.chunk_o", "chunk_fwd_o"): (
        "q", "k", "v", "h", "g", "g_gamma", "scale", "state_v_first", "cu_seqlens", "chunk_size", "chunk_indices"),
}
"""The parameters of the pieces of fla 0.6's ``chunk_gated_delta_rule_fwd`` that ``chunk_gated_delta_rule`` calls,
in order."""

DELTA_PARAMETERS = (
    "q", "k", "v", "beta", "scale", "initial_state", "output_final_state", "cu_seqlens", "chunk_indices", "chunk_size",
)
"""The parameters of fla 0.6's ``chunk_delta_rule_fwd``, in order."""

GLA_OUTPUT_PARAMETERS = (
    "q", "v", "g", "A", "h", "scale", "state_v_first", "cu_seqlens", "chunk_size", "chunk_indices", "use_graph",
)
"""The parameters of fla 0.6's ``chunk_gla_fwd_o_gk`` (the output of GLA's and KDA's chunked forwards), in order."""

KDA_PARAMETERS = {
    ("fla.ops.kda.wy_fast", "recompute_w_u_fwd"): (
        "k", "v", "beta", "A", "gk", "q", "cu_seqlens", "chunk_indices", "use_graph"),
    ("fla.ops.common.chunk_delta_h", "chunk_gated_delta_rule_fwd_h"): STATES_PARAMETERS,
    ("fla.ops.gla.chunk", "chunk_gla_fwd_o_gk"): GLA_OUTPUT_PARAMETERS,
}
"""The parameters of the pieces of fla 0.6's ``chunk_kda_fwd`` that ``chunk_kda`` calls, in order."""

KDA_SOLVE_ARGUMENTS = (
    "q", "k", "g", "beta", "Aqk", "Akkd", "Akk", "scale", "cu_seqlens", "chunk_indices", "T", "H", "HV", "K", "BT",
    "BC", "NC", "BK", "IS_VARLEN", "USE_SAFE_GATE", "USE_GRAPH",
)
"""The arguments of fla 0.6's ``chunk_kda_fwd_kernel_inter_solve_fused`` (the scores between a chunk's blocks, and
the solve of its system), in order."""

KDA_SOLVE_SET_BY_LAUNCH = {"BK", "IS_VARLEN"}
"""The arguments of ``chunk_kda_fwd_kernel_inter_solve_fused`` that its autotuner and heuristics set."""

GLA_PARAMETERS = {
    ("fla.ops.utils.cumsum", "chunk_local_cumsum_vector"): (
        "g", "chunk_size", "reverse", "scale", "cu_seqlens", "output_dtype", "chunk_indices", "use_graph", "kwargs"),
    ("fla.ops.gla.chunk", "chunk_gla_fwd_intra_gk"): (
        "q", "k", "g", "scale", "cu_seqlens", "chunk_size", "chunk_indices"),
    ("fla.ops.gla.chunk", "chunk_gla_fwd_o_gk"): GLA_OUTPUT_PARAMETERS,
}
"""The parameters of the pieces of fla 0.6's ``chunk_gla_fwd`` that ``chunk_gla`` calls, in order."""

STATES_KERNEL_ARGUMENTS = (
    "k", "v", "h", "g", "g_gamma", "gk", "gv", "h0", "ht", "cu_seqlens", "split_offsets", "T", "H", "K", "V", "BT",
    "BS", "BK", "BV", "USE_G", "USE_G_GAMMA", "USE_GK", "USE_GV", "USE_INITIAL_STATE", "STORE_FINAL_STATE",
    "IS_VARLEN", "STATE_V_FIRST",
)
"""The arguments of fla 0.6's ``chunk_fwd_kernel_h`` (the chunk states of GLA), in order."""

SET_BY_LAUNCH = {"BK", "BV", "USE_INITIAL_STATE", "STORE_FINAL_STATE", "IS_VARLEN"}
"""The arguments of ``chunk_fwd_kernel_h`` that its autotuner and heuristics set, which ``chunk_gla`` does not pass."""


def fla_function(module_name: str, name: str, parameters: tuple[str, ...]):
    """fla's function ``module_name.name`` if its parameters are ``parameters``, else None."""
    try:
        function = getattr(importlib.import_module(module_name), name)
        found = tuple(inspect.signature(function).parameters)
    except Exception:  # no fla, fla without triton, or no such function
        return None
    return function if found == parameters else None


@lru_cache(maxsize=1)
def gated_delta_forward():
    """(fla's ``chunk_gated_delta_rule_fwd_intra``, ``chunk_gated_delta_rule_fwd_h``, ``chunk_fwd_o``) if each takes
    the parameters ``GATED_DELTA_PARAMETERS`` names, else None."""
    pieces = tuple(fla_function(module, name, parameters)
                   for (module, name), parameters in GATED_DELTA_PARAMETERS.items())
    return None if None in pieces else pieces


@lru_cache(maxsize=1)
def delta_forward():
    """fla's ``chunk_delta_rule_fwd`` if its parameters are ``DELTA_PARAMETERS``, else None."""
    return fla_function("fla.ops.delta_rule.chunk", "chunk_delta_rule_fwd", DELTA_PARAMETERS)


@lru_cache(maxsize=1)
def kda_forward():
    """(fla's ``chunk_kda_fwd_kernel_inter_solve_fused`` beneath its heuristics and autotuner's launch,
    ``recompute_w_u_fwd``, ``chunk_gated_delta_rule_fwd_h``, ``chunk_gla_fwd_o_gk``) if the kernel takes
    ``KDA_SOLVE_ARGUMENTS`` (its launch setting ``KDA_SOLVE_SET_BY_LAUNCH``) and each function the parameters
    ``KDA_PARAMETERS`` names, else None."""
    pieces = tuple(fla_function(module, name, parameters) for (module, name), parameters in KDA_PARAMETERS.items())
    try:
        from fla.ops.kda.chunk_intra import chunk_kda_fwd_kernel_inter_solve_fused as solve
    except Exception:  # no fla, or fla without triton
        return None
    if None in pieces or launch_arguments(solve) != (KDA_SOLVE_ARGUMENTS, KDA_SOLVE_SET_BY_LAUNCH):
        return None
    return (solve, *pieces)


def launch_arguments(kernel) -> tuple[tuple[str, ...], set[str]]:
    """(the arguments of the Triton kernel beneath ``kernel``'s heuristics and autotuners, in order; the ones that
    every one of those sets)."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    set_by_launch = set()
    while isinstance(kernel, (Autotuner, Heuristics)):
        if isinstance(kernel, Heuristics):
            set_by_launch |= set(kernel.values)
        else:
            set_by_launch |= set.intersection(*(set(config.kwargs) for config in kernel.configs))
        kernel = kernel.fn
    return tuple(getattr(kernel, "arg_names", ())), set_by_launch


@lru_cache(maxsize=1)
def gla_forward():
    """(fla's ``chunk_local_cumsum_vector``, ``chunk_fwd_kernel_h`` beneath its heuristics and autotuner's launch,
    ``chunk_gla_fwd_intra_gk``, ``chunk_gla_fwd_o_gk``, the scale ``chunk_gla_fwd`` gives the cumulative sum) if
    each takes what ``GLA_PARAMETERS`` and ``STATES_KERNEL_ARGUMENTS`` name, and the launch's heuristics and
    autotuner set the arguments ``chunk_gla`` leaves to them, else None."""
    pieces = [fla_function(module, name, parameters) for (module, name), parameters in GLA_PARAMETERS.items()]
    try:
        from fla.ops.common.chunk_h import chunk_fwd_kernel_h
        from fla.ops.utils.constant import RCP_LN2
    except Exception:  # no fla, or fla without triton
        return None
    arguments, set_by_launch = launch_arguments(chunk_fwd_kernel_h)
    if None in pieces or arguments != STATES_KERNEL_ARGUMENTS or not set_by_launch >= SET_BY_LAUNCH:
        return None
    cumsum, intra, out = pieces
    return cumsum, chunk_fwd_kernel_h, intra, out, RCP_LN2


def direct(x: torch.Tensor, forward) -> bool:
    """Whether ``forward`` (one of the lookups above) was found and may run x's prefill without fla's wrappers: a
    GPU tensor, outside autograd, autocast (the wrappers' casts) and ``torch.compile`` (which fla's public functions
    keep out of its graphs)."""
    return (x.is_cuda and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cuda")
            and not torch.compiler.is_compiling() and forward() is not None)


def refuse_normalising(use_qk_l2norm_in_kernel: bool) -> None:
    """Refuse what the direct forwards do not do: normalise queries and keys (their callers hand them normalised)."""
    if use_qk_l2norm_in_kernel:
        raise ValueError("the direct chunked forward takes queries and keys normalised already")


def chunk_gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    initial_state: torch.Tensor | None = None, output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla's chunked gated delta rule at ``scale`` (None: d_k^-0.5) over a batch of S one-head sequences of T tokens,
    from the log decay's chunk-local sums in base 2 (``channel_gate.chunk_cumulative``, in place of the cumulative sum
    that ``chunk_gated_delta_rule_fwd`` computes first, whose kernel takes the batch and head counts as compile-time
    constants), through the pieces of ``gated_delta_forward()``: the intra-chunk system, the chunk states, the output.
    q and k are normalised already (``use_qk_l2norm_in_kernel`` must be False), beta is after its sigmoid. As a batch
    rather than packed sequences, no kernel searches its sequence by token or reads sequence boundaries, and no kernel
    takes the batch size as a compile-time constant.

    Shapes: q, k [S, T, 1, K]; v [S, T, HV, V]; g [S, T, HV] float32; beta [S, T, HV]; states [S, HV, K, V]. HV = 1
    but where HV value heads share each entry's key head (fla's layout for them, ``packed_heads.key_heads_as_batch``).
    Returns ``(o [S, T, HV, V] in q's dtype, final state [S, HV, K, V] float32 or None)``."""
    refuse_normalising(use_qk_l2norm_in_kernel)
    intra, states, output = gated_delta_forward()
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    with launching_on(q):
        w, u, _ = intra(k=k, v=v, g=g, beta=beta, chunk_size=CHUNK_SIZE)
        h, new_values, final = states(
            k=k, w=w, u=u, g=g, output_final_state=output_final_state, chunk_size=CHUNK_SIZE,
            initial_state=None if initial_state is None else initial_state.contiguous(),
        )
        o = output(q=q, k=k, v=new_values, h=h, g=g, scale=scale, chunk_size=CHUNK_SIZE)
    return o.to(q.dtype), final


def chunk_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
    initial_state: torch.Tensor | None = None, output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla's ``chunk_delta_rule`` at ``scale`` (None: d_k^-0.5) over a batch of S one-head sequences of T tokens,
    for q and k normalised already (``use_qk_l2norm_in_kernel`` must be False), through ``delta_forward()``, which
    returns (o, A, final state). As a batch rather than packed sequences (none of its kernels takes the batch size as
    a compile-time constant), no kernel reads sequence boundaries.

    Shapes: q, k [S, T, 1, K]; v [S, T, 1, V]; beta [S, T, 1]; states [S, 1, K, V].
    Returns ``(o [S, T, 1, V] in q's dtype, final state [S, 1, K, V] float32 or None)``."""
    refuse_normalising(use_qk_l2norm_in_kernel)
    q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
    with launching_on(q):
        out, _, final = delta_forward()(
            q=q, k=k, v=v, beta=beta, scale=k.shape[-1] ** -0.5 if scale is None else scale,
            initial_state=None if initial_state is None else initial_state.contiguous(),
            output_final_state=output_final_state, cu_seqlens=None, chunk_indices=None,
        )
    return out.to(q.dtype), final


def chunk_kda(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    initial_state: torch.Tensor | None = None, output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False, scale: float | None = None, state_v_first: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla's chunked KDA forward at ``scale`` (None: d_k^-0.5) over a batch of S one-head sequences of T tokens, from
    the decay's chunk-local sums in base 2 (``channel_gate.chunk_cumulative`` or ``gated_chunk_cumulative``, in place of
    the cumulative sum that ``chunk_kda_fwd`` computes first), through the pieces of ``kda_forward()``: the intra-chunk
    system (its 16-token diagonal blocks by ``kda_diagonal.diagonal_blocks``, whose programs take a token of adjacent
    batch entries where fla's token-parallel kernel takes adjacent heads, of which each entry here has one), the chunk
    states, the output. q and k are normalised already (``use_qk_l2norm_in_kernel`` must be False), beta is after its
    sigmoid, the initial state float32 (as ``chunk_kda`` requires). As a batch rather than packed sequences, no kernel
    searches its sequence by token or reads sequence boundaries, and no kernel takes the batch size as a compile-time
    constant; the states are computed value-first, as fla's KDA layer asks (the layout its kernels are tuned for), and
    taken and returned value-first with ``state_v_first``, else key-first (transposed, a copy each).

    Shapes: q, k [S, T, 1, K]; v [S, T, HV, V]; g [S, T, HV, K] float32; beta [S, T, HV]; states [S, HV, K, V], or
    [S, HV, V, K] with ``state_v_first``. HV = 1 but where HV value heads share each entry's key head (fla's layout
    for them, ``packed_heads.key_heads_as_batch``).
    Returns ``(o [S, T, HV, V] in q's dtype, final state float32 or None)``."""
    refuse_normalising(use_qk_l2norm_in_kernel)
    if initial_state is not None and initial_state.dtype != torch.float32:
        raise ValueError(f"KDA's initial state must be float32, as fla's chunk_kda requires, not {initial_state.dtype}")
    solve, recompute, states, output = kda_forward()
    if initial_state is not None and not state_v_first:
        initial_state = initial_state.transpose(-1, -2)
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    batch, length, _, width = k.shape
    heads = v.shape[2]
    scale = width**-0.5 if scale is None else scale
    with launching_on(q):
        scores = k.new_empty(batch, length, heads, CHUNK_SIZE)
        system = k.new_zeros(batch, length, heads, CHUNK_SIZE)
        blocks = k.new_empty(batch, length, heads, BLOCK, dtype=torch.float32)
        diagonal_blocks(q, k, g, beta, scale, scores, blocks)
        solve[(-(-length // CHUNK_SIZE), batch * heads)](
            q=q, k=k, g=g, beta=beta, Aqk=scores, Akkd=blocks, Akk=system, scale=scale, cu_seqlens=None,
            chunk_indices=None, T=length, H=1, HV=heads, K=width, BT=CHUNK_SIZE, BC=BLOCK, NC=CHUNK_SIZE // BLOCK,
            USE_SAFE_GATE=False, USE_GRAPH=False,
        )
        w, u, _, keys = recompute(k=k, v=v, beta=beta, A=system, gk=g)
        h, new_values, final = states(
            k=keys, w=w, u=u, gk=g, output_final_state=output_final_state, chunk_size=CHUNK_SIZE, state_v_first=True,
            initial_state=None if initial_state is None else initial_state.contiguous(),
        )
        o = output(q=q, v=new_values, g=g, A=scores, h=h, scale=scale, chunk_size=CHUNK_SIZE, state_v_first=True)
    if final is not None and not state_v_first:
        final = final.transpose(-1, -2).contiguous()
    return o.to(q.dtype), final


def chunk_gla(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
    initial_state: torch.Tensor | None = None, output_final_state: bool = False, *,
    cu_seqlens: torch.Tensor, chunk_indices: torch.Tensor, chunk_offsets: torch.Tensor, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla's ``chunk_gla`` at ``scale`` (None: d_k^-0.5) on packed sequences of one length (g: per-channel log decay
    [1, N, 1, K]), through the pieces of ``gla_forward()``, with its chunk states computed as fla's ``chunk_fwd_h``
    computes them but for the number of chunks, which such sequences give on the host (``chunk_indices``' rows):
    ``chunk_fwd_h`` reads it from the GPU (``.item()``), a wait for every queued kernel in every layer.
    Returns ``(o [1, N, 1, V], final state [S, 1, K, V] float32 or None)``."""
    cumsum, states_kernel, intra, out, cumulative_scale = gla_forward()
    q, k, v, g = (x.contiguous() for x in (q, k, v, g))
    _, length, heads, key_dim = k.shape
    value_dim, sequences, chunks = v.shape[-1], cu_seqlens.shape[0] - 1, chunk_indices.shape[0]
    scale = key_dim**-0.5 if scale is None else scale
    with launching_on(q):
        g = cumsum(g, CHUNK_SIZE, scale=cumulative_scale, cu_seqlens=cu_seqlens, chunk_indices=chunk_indices)
        states = k.new_empty(1, chunks, heads, key_dim, value_dim)
        final = k.new_empty(sequences, heads, key_dim, value_dim, dtype=torch.float) if output_final_state else None
        states_kernel[lambda meta: (-(-key_dim // meta["BK"]) * -(-value_dim // meta["BV"]) * sequences * heads,)](
            k=k, v=v, h=states, g=None, g_gamma=None, gk=g, gv=None,
            h0=None if initial_state is None else initial_state.contiguous(), ht=final, cu_seqlens=cu_seqlens,
            split_offsets=chunk_offsets, T=length, H=heads, K=key_dim, V=value_dim, BT=CHUNK_SIZE, BS=CHUNK_SIZE,
            USE_G=False, USE_G_GAMMA=False, USE_GK=True, USE_GV=False, STATE_V_FIRST=False,
        )
        positions = dict(cu_seqlens=cu_seqlens, chunk_size=CHUNK_SIZE, chunk_indices=chunk_indices)
        scores = intra(q=q, k=k, g=g, scale=scale, **positions)
        o = out(q=q, v=v, g=g, A=scores, h=states, scale=scale, **positions)
    return o, final
