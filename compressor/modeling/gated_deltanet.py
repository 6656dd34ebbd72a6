"""A Gated DeltaNet token mixer whose value heads may map to key heads in any order, and whose layers may differ.

Shipped inside every output folder (imports only torch, transformers and, optionally, fla and triton). The mixin sits on
top of a transformers GatedDeltaNet class (Qwen3.5, Qwen3-Next) and replaces its forward so that

* value head j reads key head ``value_to_key[j]`` (an explicit map after uneven pruning; j // r otherwise);
* CPU tensors use the PyTorch recurrence and CUDA tensors fla's kernels (see ``gated_delta.py``), called as
  ``self.recurrence`` (calibration swaps it on an instance for a form that also returns the chunk states);
* outside autograd, CUDA tensors take a fused gated norm in one launch (``gated_rms_norm``), copy key heads to
  the value heads that read them in one kernel (``gathered_heads``) and compute beta and the decay in one
  (``gates``);
* a decode step on CUDA replays a recorded CUDA graph of itself where it can (``decode_graph.py``).

Per-layer head counts come from ``config.per_layer_config[i]`` (transformers' heterogeneous config).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.activations import ACT2FN

from . import gated_delta
from .decode_graph import DecodeGraph, RecordedDecodeSteps
from .fla_decode_step import can_step_in_place
from .fla_rows import GATE_ACTIVATIONS, gated_norm_kernel, gated_rms_normalised, takes
from .gated_delta import gated_delta_rule
from .head_gate import head_gates, write_strengths
from .head_gate import takes as head_gate_takes
from .head_gate import takes_beta as head_gate_takes_beta
from .head_gather import gather_heads
from .head_gather import takes as gather_takes
from .head_norm import rms_normalised
from .head_norm import takes as head_norm_takes
from .packed_heads import head_major, head_major_like, sigmoid_head_major

T = TypeVar("T")

TRANSFORMERS_FLOOR = (5, 21)
"""The oldest transformers whose caches this code uses (``get_conv_state`` appeared in 5.21)."""
if tuple(int(part) for part in transformers.__version__.split(".")[:2]) < TRANSFORMERS_FLOOR:
    raise ImportError(f"this model's code needs transformers >= {'.'.join(map(str, TRANSFORMERS_FLOOR))}, found "
                      f"{transformers.__version__}: pip install -U 'transformers>={'.'.join(map(str, TRANSFORMERS_FLOOR))}'")

FIELDS = {
    "num_key_heads": "linear_num_key_heads", "num_value_heads": "linear_num_value_heads",
    "key_dim": "linear_key_head_dim", "value_dim": "linear_value_head_dim", "value_to_key": "linear_value_to_key_head",
    "query_scale": "linear_query_scale",
}
"""The config fields of a layer's heads (Qwen3.5, Qwen3-Next, OLMo-Hybrid); ``value_to_key``: per-layer, for each
kept value head, the index of the kept key head it reads (absent: the stock grouping); ``query_scale``: the scale of
the queries of a layer whose query/key channels were removed (absent: d_k^-0.5, the kernels' default)."""


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """Depthwise causal convolution in the weight's dtype (as transformers' own fallback computes it).
    x [B, C, T], weight [C, W] -> [B, C, T] in x's dtype."""
    out = F.conv1d(x.to(weight.dtype), weight.unsqueeze(1), bias, padding=weight.shape[-1] - 1, groups=x.shape[1])
    return ACT2FN[activation](out[..., : x.shape[-1]]).to(x.dtype)


def causal_conv1d_step(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str
) -> torch.Tensor:
    """One decode step of the causal convolution; updates conv_state [B, C, W] in place. x [B, C, 1] -> [B, C, 1]."""
    window = torch.cat([conv_state, x], dim=-1).to(weight.dtype)
    conv_state.copy_(window[..., -conv_state.shape[-1] :])
    out = F.conv1d(window[..., -weight.shape[-1] :], weight.unsqueeze(1), bias, groups=x.shape[1])
    return ACT2FN[activation](out).to(x.dtype)


def gated_rms_norm(norm: nn.Module, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``norm(x, gate)`` = weight · x / rms(x) · act(gate) (act: the norm's activation) for x, gate [..., d_v] ->
    [..., d_v] in x's dtype (``norm``: the layer's stock RMSNormGated). Float64 rows off a GPU take the same formula
    in float64 (the stock forward computes in float32, whose row sums round differently for different numbers of
    rows). CUDA tensors outside autograd take one launch (where the stock forward launches about a dozen; it keeps
    float32 until the end, where the stock forward rounds to x's dtype before the weight): the recurrence's
    head-major output through ``head_norm.rms_normalised``, which reads it as it lies, other rows through fla's
    fused kernel (``fla_rows.gated_rms_normalised``), unless the recurrences are kept off fla
    (``gated_delta.HAS_FLA`` cleared).
    Everything else: the stock forward."""
    if x.dtype == torch.float64 and not x.is_cuda:
        normalised = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return norm.weight * normalised * ACT2FN[norm.activation](gate)
    if not gated_delta.HAS_FLA or norm.activation not in GATE_ACTIVATIONS:
        return norm(x, gate)
    if head_norm_takes(x, gate):
        return rms_normalised(x, norm.weight, norm.variance_epsilon, gate, norm.activation)
    if not takes(x) or gated_norm_kernel() is None:
        return norm(x, gate)
    width = x.shape[-1]
    rows = gated_rms_normalised(x.reshape(-1, width).contiguous(), gate.reshape(-1, width).contiguous(), norm.weight,
                                norm.variance_epsilon, norm.activation)
    return rows.view(x.shape)


def canonical_value_to_key(num_value_heads: int, num_key_heads: int) -> list[int]:
    """The stock grouping: value head j reads key head j // (num_value_heads / num_key_heads)."""
    return [j * num_key_heads // num_value_heads for j in range(num_value_heads)]


class PrunableGatedDeltaNetMixin(RecordedDecodeSteps):
    """Forward pass shared by the pruned Gated DeltaNet mixers. Subclasses implement ``project``."""

    recurrence = staticmethod(gated_delta_rule)
    """(q, k [B, T, H_v, d_k], v [B, T, H_v, d_v], g, beta [B, T, H_v], initial_state, output_final_state) ->
    (o [B, T, H_v, d_v], final state [B, H_v, d_k, d_v] or None)."""

    def set_value_to_key(self, value_to_key: list[int] | None) -> None:
        """Set which key head each value head reads (None: the stock j // r grouping); drops the recorded decode
        graph, which read the old head indices (made once per device)."""
        if value_to_key is None:
            value_to_key = canonical_value_to_key(self.num_v_heads, self.num_k_heads)
        if len(value_to_key) != self.num_v_heads or sorted(set(value_to_key)) != list(range(self.num_k_heads)):
            raise ValueError(
                f"layer {self.layer_idx}: value_to_key {value_to_key} must name each of the "
                f"{self.num_k_heads} key heads for {self.num_v_heads} value heads"
            )
        self.value_to_key = list(value_to_key)
        # device -> key_index; (device, count) -> slab_index; ("values", device) -> value_index (fla's mixers)
        self._index_cache: dict = {}
        self._decode_graph = DecodeGraph()

    @classmethod
    def adopt(cls, module: nn.Module, value_to_key: list[int] | None = None) -> nn.Module:
        """Turn a stock transformers mixer into this class in place (same parameters, new forward)."""
        module.__class__ = cls
        module.set_value_to_key(value_to_key)
        return module

    def key_index(self, device: torch.device) -> torch.Tensor:
        """Long tensor [H_v]: the key head of every value head."""
        if device not in self._index_cache:
            with torch.inference_mode(False):  # an inference tensor could not be saved by a later backward pass
                self._index_cache[device] = torch.tensor(self.value_to_key, dtype=torch.long, device=device)
        return self._index_cache[device]

    def slab_index(self, count: int, device: torch.device) -> torch.Tensor:
        """Long tensor [count·H_v]: for slab i of ``count`` groups of key heads laid out one after another, the
        position of the key head that each value head reads, i·H_k + ``value_to_key[j]`` (made once per device
        and count and kept, except when first asked for inside CUDA graph capture; ``key_index`` must be kept
        before then: it copies from the host)."""
        return self.kept_index((device, count), device, lambda: (
            torch.arange(count, device=device)[:, None] * self.num_k_heads + self.key_index(device)).reshape(-1))

    def kept_index(self, key, device: torch.device, make) -> torch.Tensor:
        """The index tensor kept under ``key``, made by ``make()`` (outside inference mode) the first time; not kept
        when first made inside CUDA graph capture (a captured tensor is written only by the graph's replay)."""
        if key not in self._index_cache:
            with torch.inference_mode(False):
                index = make()
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return index
            self._index_cache[key] = index
        return self._index_cache[key]

    def gathered_heads(self, groups: Sequence[torch.Tensor]) -> torch.Tensor:
        """Key heads of G groups (queries, keys), each [B, H_k, T, d] (any strides) -> value heads [G, B, H_v, T, d],
        contiguous, value head j a copy of key head ``value_to_key[j]``. Where ``head_gather.takes`` them (on a GPU
        outside autograd, two groups of one layout), one launch that reads the key heads where they lie
        (``head_gather.gather_heads``); otherwise the groups stacked head-major, then whole slabs of T·d elements
        gathered along the first dimension, the one PyTorch gathers at memory speed: along a later dimension of a
        strided view, ``index_select`` is several times slower (``scripts/bench_head_gather.py``)."""
        batch, key_heads, length, width = groups[0].shape
        if gather_takes(groups):
            return gather_heads(groups, self.key_index(groups[0].device))
        slabs = torch.stack(tuple(groups)).view(len(groups) * batch * key_heads, length * width)
        gathered = slabs.index_select(0, self.slab_index(len(groups) * batch, slabs.device))
        return gathered.view(len(groups), batch, self.num_v_heads, length, width)

    def queries_and_keys(self, query_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries then keys [B, T, 2·H_k·d_k] -> q, k [B, T, H_v, d_k], value head j reading key head
        ``value_to_key[j]``, both head-major (so that the recurrence hands its heads to fla's kernels without a copy)
        and from one gather (``gathered_heads``), so that they tile one block of memory."""
        batch, length, _ = query_key.shape
        heads = query_key.reshape(batch, length, 2, self.num_k_heads, self.head_k_dim).permute(2, 0, 3, 1, 4)
        query, key = self.gathered_heads(heads.unbind(0)).transpose(2, 3)
        return query, key

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """hidden [B, T, D] -> (qkv [B, T, 2·H_k·d_k + H_v·d_v], z [B, T, H_v·d_v], b [B, T, H_v], a [B, T, H_v])."""
        raise NotImplementedError

    def gates(self, a: torch.Tensor, b: torch.Tensor, values_per_key: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(beta, g) [B, T, H_v] from the b and a projections (``write_strength`` and ``decay``), head-major; on a GPU
        outside autograd both in one launch (``head_gate.head_gates``), which alone writes them for r =
        ``values_per_key`` > 1 value heads per key head, as [B, T, H_v / r, r] in fla's layout for them."""
        dtype = torch.promote_types(self.dt_bias.dtype, torch.float32)
        if values_per_key > 1 or head_gate_takes(a, b, dtype):
            bias, rate = self.decay_parameters(dtype)
            g, beta = head_gates(a, b, bias, rate, self.beta_scale, values_per_key, beta_dtype=self.beta_dtype(b))
            return beta, g
        return self.write_strength(b), self.decay(a)

    beta_in_float32 = False
    """Whether beta is written in float32 at least (fla's layers: their kernels apply the sigmoid in float32), or in
    b's dtype (transformers' layers round sigmoid(b) to it)."""

    def beta_dtype(self, b: torch.Tensor) -> torch.dtype:
        """The dtype beta is written in from the b projection b (``beta_in_float32``)."""
        return torch.promote_types(b.dtype, torch.float32) if self.beta_in_float32 else b.dtype

    @property
    def beta_scale(self) -> float:
        """2 where the layer allows negative eigenvalues (beta in (0, 2): fla's and OLMo-Hybrid's
        ``allow_neg_eigval``), else 1."""
        return 2.0 if getattr(self, "allow_neg_eigval", False) else 1.0

    def write_strength(self, b: torch.Tensor, values_per_key: int = 1) -> torch.Tensor:
        """beta [B, T, H_v] from the b projection [B, T, H_v]: ``beta_scale`` · sigmoid(b) in ``beta_dtype(b)``,
        head-major, or [B, T, H_v / r, r] in fla's layout for r = ``values_per_key`` value heads that share key heads.
        Where beta is written in another dtype than b's, one launch on a GPU (``head_gate.write_strengths``), else
        ``sigmoid_head_major``."""
        dtype, scale = self.beta_dtype(b), self.beta_scale
        if dtype != b.dtype and head_gate_takes_beta(b):
            return write_strengths(b, scale, values_per_key, dtype)
        if values_per_key > 1:
            b = b.unflatten(-1, (-1, values_per_key))
        beta = sigmoid_head_major(b, dtype)
        return beta if scale == 1.0 else beta * scale

    def decay(self, a: torch.Tensor) -> torch.Tensor:
        """The log decay g = -exp(A_log) · softplus(a + dt_bias) [B, T, H_v] from the a projection [B, T, H_v], in
        float32 (float64 where dt_bias is), head-major: on CUDA it packs as a view. Outside autograd it takes three
        launches (``gates`` one, with beta, where ``head_gate`` runs), the parameters' part kept by
        ``decay_parameters``."""
        dtype = torch.promote_types(self.dt_bias.dtype, torch.float32)
        bias, rate = self.decay_parameters(dtype)
        if torch.is_grad_enabled():
            return F.softplus(head_major(a, dtype) + bias) * rate
        return torch.mul(F.softplus(a + bias), rate, out=head_major_like(a, dtype))

    def decay_parameters(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(dt_bias, -exp(A_log)) [H_v] in ``dtype`` (the rate computed from A_log in float32, as the stock forwards
        compute it), ``kept`` between forwards."""
        return self.kept("decay", lambda: (self.dt_bias.to(dtype), (-self.A_log.float().exp()).to(dtype)),
                         self.dt_bias, self.A_log, key=(dtype,))

    def kept(self, name: str, compute: Callable[[], T], *parameters: torch.Tensor, key: tuple = ()) -> T:
        """``compute()``, a function of ``parameters`` (and of ``key``) alone. In eval mode, outside autograd and CUDA
        graph capture, it is kept under ``name`` until one of them changes (its version counter, memory, dtype or
        device) or ``key`` does, so that an eager forward launches no kernel for it; ``train()`` and ``eval()`` drop
        what was kept. Writes that bypass the version counter (through ``.data``, fused optimizers) are seen after
        the next ``train()`` or ``eval()``. A captured graph computes it in every replay, and so does every call for
        parameters made under ``torch.inference_mode``, which keep no version counter."""
        if (self.training or torch.is_grad_enabled() or any(p.is_inference() for p in parameters)
                or (parameters[0].is_cuda and torch.cuda.is_current_stream_capturing())):
            return compute()
        key = (*key, *((p._version, p.data_ptr(), p.dtype, p.device) for p in parameters))
        store = self.__dict__.setdefault("_kept", {})
        if name not in store or store[name][0] != key:
            store[name] = (key, compute())
        return store[name][1]

    def train(self, mode: bool = True):
        """``nn.Module.train``, dropping what ``kept`` kept (a training step may have written the parameters without
        their version counters)."""
        self.__dict__.pop("_kept", None)
        return super().train(mode)

    def steps_in_place(self, recurrent_state: torch.Tensor | None) -> bool:
        """Whether fla's decode step writes the new state over ``recurrent_state`` (``fla_decode_step.py``)."""
        return gated_delta.HAS_FLA and can_step_in_place(recurrent_state)

    def mix(
        self, hidden_states: torch.Tensor, conv_state: torch.Tensor | None = None,
        recurrent_state: torch.Tensor | None = None, cache=None, stepping: bool = False,
    ) -> torch.Tensor:
        """hidden [B, T, D] -> [B, T, D] from the cache's states (None: none yet). ``stepping``: one token after a
        cached conv_state [B, C, W], which is updated in place, as recurrent_state [B, H_v, d_k, d_v] is where
        ``gated_delta_rule`` can; otherwise ``cache`` (if any) receives the new states."""
        batch, length, _ = hidden_states.shape
        mixed_qkv, z, b, a = self.project(hidden_states)
        mixed_qkv = mixed_qkv.transpose(1, 2)
        weight = self.conv1d.weight.squeeze(1)
        if stepping:
            mixed_qkv = causal_conv1d_step(mixed_qkv, conv_state, weight, self.conv1d.bias, self.activation)
        else:
            if cache is not None:
                mixed_qkv = cache.update_conv_state(
                    mixed_qkv, self.layer_idx, conv_kernel_size=self.conv_kernel_size
                )
            mixed_qkv = causal_conv1d(mixed_qkv, weight, self.conv1d.bias, self.activation)[..., -length:]
        mixed_qkv = mixed_qkv.transpose(1, 2)

        query_key, value = torch.split(mixed_qkv, [2 * self.key_dim, self.value_dim], dim=-1)
        query, key = self.queries_and_keys(query_key)
        value = value.reshape(batch, length, self.num_v_heads, self.head_v_dim)
        beta, g = self.gates(a, b)

        out, final_state = self.recur(query, key, value, g, beta, recurrent_state, cache)
        if cache is not None:
            cache.update_recurrent_state(final_state, self.layer_idx)

        out = gated_rms_norm(self.norm, out, z.reshape(batch, length, -1, self.head_v_dim))
        return self.out_proj(out.reshape(batch, length, -1))


@contextmanager
def global_head_counts(config) -> Iterator[None]:
    """Let stock constructors read per-layer attributes globally (they build full-size mixers, replaced next),
    without transformers' warning about it."""
    previous = config.__dict__.get("allow_global_per_layer_attribute_access")
    config.allow_global_per_layer_attribute_access = True
    heterogeneity_logger = logging.getLogger("transformers.integrations.heterogeneity.configuration_utils")
    level = heterogeneity_logger.level
    heterogeneity_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        heterogeneity_logger.setLevel(level)
        if previous is None:
            config.__dict__.pop("allow_global_per_layer_attribute_access", None)
        else:
            config.allow_global_per_layer_attribute_access = previous


def install_mixers(model: nn.Module, mixer_cls: type, fields: dict[str, str] = FIELDS, mixer_attr: str = "linear_attn",
                   linear_layer_type: str | None = None) -> None:
    """Give every linear-attention layer of ``model`` its own head counts and head map from
    ``config.per_layer_config`` (every family's model class calls this after building its stock layers).

    ``fields`` names the config attributes (a modeling file's ``FIELDS``); the mixers sit at ``mixer_attr`` (of the
    layers whose ``config.layer_types`` entry is ``linear_layer_type``, when given). Layers whose counts differ
    or key head size from the stock-built mixer get a new ``mixer_cls(layer_config, index)``; every mixer is adopted
    into ``mixer_cls`` (same parameters) with the layer's head map and query scale.
    """
    config = model.config
    for index, layer in enumerate(model.model.layers):
        if not hasattr(layer, mixer_attr):
            continue
        if linear_layer_type is not None and config.layer_types[index] != linear_layer_type:
            continue
        layer_config = config.per_layer_config[index]
        mixer = getattr(layer, mixer_attr)
        keys = getattr(layer_config, fields["num_key_heads"])
        values = getattr(layer_config, fields["num_value_heads"]) or keys
        key_dim = getattr(layer_config, fields["key_dim"], None)
        if (keys, values) != built_head_counts(mixer) or key_dim not in (None, built_key_dim(mixer)):
            mixer = mixer_cls(layer_config, index)
            setattr(layer, mixer_attr, mixer)
        mixer_cls.adopt(mixer, getattr(layer_config, fields["value_to_key"], None))
        mixer.query_scale = getattr(layer_config, fields["query_scale"], None)


def built_key_dim(mixer: nn.Module) -> int:
    """The key head size of a mixer as built, whatever its library calls it."""
    return getattr(mixer, "head_k_dim", None) or mixer.head_dim


def built_head_counts(mixer: nn.Module) -> tuple[int, int]:
    """(key heads, value heads) of a mixer as built, whatever its library calls them."""
    keys = getattr(mixer, "num_k_heads", None) or mixer.num_heads
    return keys, getattr(mixer, "num_v_heads", None) or keys
