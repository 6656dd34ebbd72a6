"""fla's building blocks with CPU tensors routed to PyTorch, and per-layer heads for fla models.

Shipped inside output folders of fla families (imports only torch, transformers and fla). fla's modules call
Triton kernels for every tensor, and Triton crashes on CPU tensors; each class here is a subclass of an fla
module with the same parameters, whose forward calls fla for CUDA tensors and a PyTorch reference otherwise.
``route_to_torch`` swaps the classes of a built model in place, so state dicts and parameter names are fla's.

Shapes: hidden states [B, T, D]; short-convolution caches [B, D, W] (fla's layout: the last W inputs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from fla.layers.utils import update_layer_cache
from fla.modules import FusedRMSNormGated, GatedMLP, RMSNorm, ShortConvolution
from fla.modules.activations import ACT2FN as FLA_ACT2FN
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from .fla_rows import GATE_ACTIVATIONS, gated_norm_kernel, gated_rms_normalised, takes
from .head_norm import rms_normalised
from .head_norm import takes as head_norm_takes
from .gated_deltanet import PrunableGatedDeltaNetMixin, global_head_counts, install_mixers
from .packed_heads import L2_EPS
from .short_conv import convolved_heads
from .short_conv import takes as short_conv_takes
from .stock_dispatch import HubKernelsOffByDefault


def working(x: torch.Tensor) -> torch.Tensor:
    """x in the CPU paths' working precision: float32, or float64 for float64 x."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMS normalisation of the last dimension in working precision; returns [..., D] in it."""
    x = working(x)
    out = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.to(x.dtype)
    return out if bias is None else out + bias.to(x.dtype)


class TorchRoutedRMSNorm(RMSNorm):
    """fla's RMSNorm (optionally adding a residual first, ``prenorm`` returning the sum too). A recurrence's
    head-major output on CUDA outside autograd takes ``head_norm.rms_normalised``, which reads it as it lies."""

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        if residual is None and not prenorm and self.weight is not None and self.bias is None and head_norm_takes(x):
            return rms_normalised(x, self.weight, self.eps)
        if x.is_cuda:
            return super().forward(x, residual=residual, prenorm=prenorm, residual_in_fp32=residual_in_fp32)
        summed = working(x) if residual is None else working(x) + working(residual)
        out = rms_norm(summed, self.weight, self.bias, self.eps).to(x.dtype)
        if not prenorm:
            return out
        return out, summed if residual_in_fp32 else summed.to(x.dtype)


class TorchRoutedFusedRMSNormGated(FusedRMSNormGated):
    """fla's gated RMSNorm: rmsnorm(x) · w · act(g), act = swish (silu) or sigmoid. On CUDA, outside autograd and
    without a residual, one launch: a recurrence's head-major output through ``head_norm.rms_normalised``, which
    reads it as it lies, other rows through fla's kernel (``fla_rows.gated_rms_normalised``: the same kernel, none of
    the wrappers of fla's public function); otherwise fla's module."""

    def forward(self, x, g, residual=None, prenorm=False, residual_in_fp32=False):
        if (residual is None and not prenorm and self.weight is not None and self.bias is None
                and self.activation in GATE_ACTIVATIONS and head_norm_takes(x, g)):
            return rms_normalised(x, self.weight, self.eps, g, self.activation)
        if (x.is_cuda and residual is None and not prenorm and self.weight is not None and self.bias is None
                and takes(x) and gated_norm_kernel() is not None):
            width = x.shape[-1]
            rows = gated_rms_normalised(x.reshape(-1, width).contiguous(), g.reshape(-1, width).contiguous(),
                                        self.weight, self.eps, self.activation)
            return rows.view(x.shape)
        if x.is_cuda:
            return super().forward(x, g, residual=residual, prenorm=prenorm, residual_in_fp32=residual_in_fp32)
        if residual is not None or prenorm:
            raise NotImplementedError("the CPU path of FusedRMSNormGated takes no residual")
        gate = working(g)
        gate = gate.sigmoid() if self.activation == "sigmoid" else F.silu(gate)
        return (rms_norm(x, self.weight, self.bias, self.eps) * gate).to(x.dtype)


class TorchRoutedGatedMLP(GatedMLP):
    """fla's SwiGLU MLP: down(silu(gate(x)) · up(x))."""

    def forward(self, x, **kwargs):
        if x.is_cuda:
            return super().forward(x, **kwargs)
        if self.hidden_act != "swish":
            raise NotImplementedError(f"the CPU path of GatedMLP supports hidden_act='swish', not {self.hidden_act!r}")
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def short_convolution(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    cache: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution in working precision after the cached inputs.

    x [B, T, D], weight [D, W], cache [B, D, W] (the last W inputs, fla's layout) or None (zeros).
    Returns (y [B, T, D] in x's dtype, new cache [B, D, W] in x's dtype).
    """
    batch, length, channels = x.shape
    width = weight.shape[-1]
    past = x.new_zeros(batch, channels, width - 1) if cache is None else cache[..., 1:].to(x.dtype)
    window = torch.cat([past, x.transpose(1, 2)], dim=-1)  # [B, D, W - 1 + T]
    widened = working(window)
    y = F.conv1d(widened, weight.to(widened.dtype).unsqueeze(1), None if bias is None else bias.to(widened.dtype),
                 groups=channels)
    if activation is not None:
        y = F.silu(y)
    return y.transpose(1, 2).to(x.dtype), window[..., -width:].contiguous()


class TorchRoutedShortConvolution(ShortConvolution):
    """fla's ShortConvolution: ``(y [B, T, D], cache [B, D, W] or None)``; the cache holds the last W inputs."""

    def forward(self, x, residual=None, mask=None, cache=None, output_final_state=False, cu_seqlens=None, **kwargs):
        if x.is_cuda:
            return super().forward(x, residual=residual, mask=mask, cache=cache,
                                   output_final_state=output_final_state, cu_seqlens=cu_seqlens, **kwargs)
        if cu_seqlens is not None:
            raise NotImplementedError("the CPU path of ShortConvolution takes no packed sequences (cu_seqlens)")
        if mask is not None:
            x = x * mask.unsqueeze(-1).to(x.dtype)
        y, new_cache = short_convolution(x, self.weight.squeeze(1), self.bias, self.activation, cache)
        if residual is not None:
            y = y + residual
        if cache is not None and x.shape[1] == 1 and not torch.is_grad_enabled():
            cache.copy_(new_cache)  # fla updates a decode step's cache in place
        return y, (new_cache if output_final_state else None)


ROUTED: dict[type, type] = {
    RMSNorm: TorchRoutedRMSNorm,
    FusedRMSNormGated: TorchRoutedFusedRMSNormGated,
    GatedMLP: TorchRoutedGatedMLP,
    ShortConvolution: TorchRoutedShortConvolution,
}


def route_to_torch(model: nn.Module) -> None:
    """Give every fla norm, MLP and short convolution of ``model`` its CPU-routed class, in place."""
    for module in model.modules():
        routed = ROUTED.get(type(module))
        if routed is not None:
            module.__class__ = routed


def check_supported(config) -> None:
    """Refuse fla configs this code cannot run: full-attention layers (fla's Attention needs flash-attn), attention
    residuals (a Triton-only kernel) and GLA's shared key/value heads."""
    if getattr(config, "attn", None) is not None:
        raise ValueError(
            f"{config.model_type}: hybrid fla models with full-attention layers (config.attn) are not supported: "
            "fla's Attention layer has no CPU path"
        )
    if getattr(config, "attnres_block_size", None) is not None:
        raise ValueError(f"{config.model_type}: attention residuals (attnres_block_size) are not supported")
    for layer_config in config.per_layer_config:
        kv_heads = getattr(layer_config, "num_kv_heads", None)
        if kv_heads is not None and kv_heads != layer_config.num_heads:
            raise ValueError(
                f"{config.model_type}: shared key/value heads (num_kv_heads < num_heads) are not supported"
            )


class PrunedFlaForCausalLMMixin(HubKernelsOffByDefault):
    """What compressor's fla causal-LM classes add to fla's (list it first among the bases):

    - every layer reads its heads from ``config.per_layer_config`` (the subclass names its ``mixer_class`` and the
      config ``head_fields`` that ``install_mixers`` reads);
    - CPU tensors never reach Triton (``route_to_torch``; a plain cross-entropy instead of fla's fused losses);
    - transformers' ``cache`` argument reaches fla's ``past_key_values``: transformers >= 5.24 generates with
      ``cache=``, which fla 0.6's ``forward`` would swallow into ``**kwargs``, so every decode step would run
      without its recurrent state.
    """

    mixer_class: type
    head_fields: dict[str, str]

    def __init__(self, config):
        check_supported(config)
        with global_head_counts(config):
            super().__init__(config)
        install_mixers(self, self.mixer_class, self.head_fields, mixer_attr="attn")
        route_to_torch(self)

    def forward(self, *args, cache=None, **kwargs):
        if cache is not None and kwargs.get("past_key_values") is None:
            kwargs["past_key_values"] = cache
        return super().forward(*args, **kwargs)

    def _compute_logits_and_loss(self, hidden_states: torch.Tensor, labels=None, *args, **kwargs):
        compute = super()._compute_logits_and_loss
        if hidden_states.is_cuda:
            return compute(hidden_states, labels, *args, **kwargs)
        kwargs = {**kwargs, "fuse_linear_cross_entropy": False}
        if getattr(self, "criterion", None) is not None:  # the user's own loss
            return compute(hidden_states, labels, *args, **kwargs)
        self.criterion = nn.CrossEntropyLoss()
        try:
            return compute(hidden_states, labels, *args, **kwargs)
        finally:
            del self.criterion


def register_classes(config_cls: type, model_cls: type) -> type:
    """Register ``model_cls`` with AutoModelForCausalLM for fla's ``config_cls`` and for a subclass of it under the
    model type ``<type>_per_layer``, also registered with AutoConfig; return that subclass, the config class of
    folders with per-layer heads.

    The own model type is what makes those folders load with their shipped code: once fla is imported,
    transformers prefers fla's registered classes for fla's model types to a folder's ``auto_map``, and fla's
    classes cannot read per-layer heads. ``model_cls.config_class`` stays fla's config, so the second registration
    goes to the mapping directly (``AutoModelForCausalLM.register`` insists the class names match).
    """

    def __init__(self, **kwargs):  # keeps fla's __init__: transformers makes every config subclass a dataclass
        super(per_layer, self).__init__(**kwargs)

    per_layer = type(
        f"{config_cls.__name__.removesuffix('Config')}PerLayerConfig",
        (config_cls,),
        {"model_type": f"{config_cls.model_type}_per_layer", "__init__": __init__, "__module__": model_cls.__module__,
         "__doc__": f"fla's {config_cls.__name__} under a model type of its own, for folders with per-layer heads."},
    )
    AutoConfig.register(per_layer.model_type, per_layer, exist_ok=True)
    AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
    AutoModelForCausalLM._model_mapping.register(per_layer, model_cls, exist_ok=True)
    return per_layer


class FlaMixerMixin(PrunableGatedDeltaNetMixin):
    """What compressor reads from an fla token mixer (``num_k_heads``, ``num_v_heads``, ``value_to_key``,
    ``out_proj``: fla's ``o_proj``, ``recurrence``) and the steps its forward passes share. Subclasses define
    ``forward`` and ``recurrence``."""

    @property
    def num_k_heads(self) -> int:
        return self.num_heads

    @property
    def out_proj(self) -> nn.Linear:
        return self.o_proj

    @staticmethod
    def unpadded(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Zero the inputs at padded positions (``attention_mask`` [B, T'] with 0 = padding; its last T columns
        belong to ``hidden_states`` [B, T, D]): the states stay zero across left padding, so it is exact."""
        if attention_mask is None:
            return hidden_states
        return hidden_states * attention_mask[:, -hidden_states.shape[1] :, None].to(hidden_states.dtype)

    normalises_convolved_keys = True
    """Whether the recurrence L2-normalises q and k as the short convolutions hand them (Gated DeltaNet, KDA);
    DeltaNet and GLA override it."""

    def qkv_heads(self, hidden_states, last_state, use_cache, values_per_key: int = 1):
        """(q [B, T, H_v, d_k], k [B, T, H_v, d_k], v [B, T, H_v, d_v], the three conv caches [B, ·, W] (None each
        unless ``use_cache``) or None without convolutions, whether q and k are L2-normalised already) from hidden
        [B, T, D]: the projections, their short convolutions (without them, ``unconvolved``), then ``heads``. Where
        ``short_conv.takes`` the convolutions and ``heads`` is the class's own (no mask wraps it), the convolutions
        write the heads themselves, head-major, in two launches (``convolved_heads``); the launch of q and k also
        normalises them where the recurrence would (``normalises_convolved_keys``) and is the class's own (no
        capture or mask wraps it, which must see them unnormalised). ``values_per_key`` = r > 1 (where
        ``shared_key_ratio`` gave it): q and k [B, T, H_k, d_k], once per key head, and v [B, T, H_k, r, d_v], fla's
        layout for value heads that share key heads."""
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        if not self.use_short_conv:
            return (*self.heads(*self.unconvolved(q, k, v)), None, False)
        caches = last_state["conv_state"] if last_state is not None else (None, None, None)
        convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
        if values_per_key > 1 or self.convolves_heads(q):
            normalise = self.normalises_convolved_keys and "recurrence" not in vars(self)
            return (*self.convolved_heads((q, k, v), convs, caches, use_cache, normalise, values_per_key), normalise)
        (q, conv_q), (k, conv_k), (v, conv_v) = (
            conv(x, cache=cache, output_final_state=use_cache) for conv, x, cache in zip(convs, (q, k, v), caches)
        )
        return (*self.heads(q, k, v), (conv_q, conv_k, conv_v), False)

    def unconvolved(self, q, k, v):
        """The activations a layer without short convolutions applies to its projections q, k [B, T, H_k·d_k] and
        v [B, T, H_v·d_v] before ``heads``: silu on all three (Gated DeltaNet, KDA)."""
        return F.silu(q), F.silu(k), F.silu(v)

    def convolves_heads(self, projection: torch.Tensor) -> bool:
        """Whether the short convolutions write the heads (``convolved_heads``) for a projection [B, T, ·]: where
        ``short_conv.takes`` them and ``heads`` is the class's own (no mask wraps it)."""
        return (self.use_short_conv and "heads" not in vars(self)
                and short_conv_takes(projection, (self.q_conv1d, self.k_conv1d, self.v_conv1d),
                                     (self.head_k_dim, self.head_v_dim)))

    def shared_key_ratio(self, projection: torch.Tensor) -> int:
        """r = H_v / H_k where this forward may hand the recurrence value heads that share key heads in fla's layout
        (``packed_heads.key_heads_as_batch``, which reads each key head once): r > 1 value heads under every key
        head in the stock grouping (value head j reads key head j // r), the short convolutions writing the heads
        (``convolves_heads``) and the recurrence the class's own (a calibration capture or mask sees one head per value
        head). Else 1. ``projection`` [B, T, ...]: any projection of the layer's input (what ``short_conv.takes``
        reads of it: device, dtype, length); subclasses add what their recurrence needs."""
        ratio = self.num_v_heads // self.num_k_heads
        if (ratio == 1 or "recurrence" in vars(self) or not self.normalises_convolved_keys
                or self.value_to_key != [j // ratio for j in range(self.num_v_heads)]
                or not self.convolves_heads(projection)):
            return 1
        return ratio

    def convolved_heads(self, projections, convs, caches, use_cache, normalise, values_per_key: int = 1):
        """``qkv_heads`` for layers with short convolutions, through ``short_conv.convolved_heads``: q and k convolved
        into one block [2, B, H_v, T, d_k] (value head j convolving key head ``value_to_key[j]``; L2-normalised with
        fla's epsilon where ``normalise``), v into [1, B, H_v, T, d_v]; the new caches, written by the same launches,
        where ``use_cache``, else Nones. With ``values_per_key`` = r > 1, q and k once per key head,
        [2, B, H_k, T, d_k], and v [1, B, H_k, T, r, d_v]."""
        device = projections[0].device
        parts = [(x, conv.weight.squeeze(1), conv.bias, None if cache is None else cache.contiguous())
                 for x, conv, cache in zip(projections, convs, caches)]
        key_part, value_part = (tuple(zip(*group)) for group in (parts[:2], parts[2:]))
        key_index = self.key_index(device) if values_per_key == 1 else self.kept_index(
            ("keys", device), device, lambda: torch.arange(self.num_k_heads, device=device))
        block, key_states = convolved_heads(*key_part, key_index, self.head_k_dim, convs[0].activation is not None,
                                            L2_EPS if normalise else None, output_final_state=use_cache)
        values, value_states = convolved_heads(*value_part, self.value_index(device), self.head_v_dim,
                                               convs[2].activation is not None, output_final_state=use_cache,
                                               values_per_key=values_per_key)
        q, k = block.transpose(2, 3)
        states = (*key_states, *value_states) if use_cache else (None, None, None)
        return q, k, values[0].transpose(1, 2), states

    def value_index(self, device: torch.device) -> torch.Tensor:
        """Long tensor [H_v]: 0, 1, ..., H_v - 1 (each value head convolves its own channels), kept per device
        (``kept_index``)."""
        return self.kept_index(("values", device), device, lambda: torch.arange(self.num_v_heads, device=device))

    def heads(self, q, k, v):
        """Split into heads, q and k repeated per value head by ``value_to_key``, head-major and tiling one block
        (which ``packed_heads.normalised_pair`` normalises in one launch): one stacking copy where value head j reads
        key head j, else their gather into one block (``gathered_heads``):
        (q [B, T, H_v, d_k], k [B, T, H_v, d_k], v [B, T, H_v, d_v])."""
        batch, length, _ = v.shape
        heads = tuple(x.reshape(batch, length, self.num_k_heads, self.head_k_dim).transpose(1, 2) for x in (q, k))
        if self.value_to_key == list(range(self.num_k_heads)):  # as many value heads as key heads, in order
            block = torch.stack(heads)  # [2, B, H_k, T, d_k]
        else:
            block = self.gathered_heads(heads)  # [2, B, H_v, T, d_k]
        q, k = block.transpose(2, 3)
        return q, k, v.reshape(batch, length, self.num_v_heads, self.head_v_dim)

    def finish(self, out, hidden_states, past_key_values, final_state, conv_states):
        """Update the cache, then the (gated) output norm and ``o_proj``: out [B, T, H_v, d_v] or [B, T, H_k, r, d_v]
        (``shared_key_ratio``) -> [B, T, D]."""
        batch, length = out.shape[:2]
        update_layer_cache(self, past_key_values, recurrent_state=final_state, conv_state=conv_states, offset=length)
        if self.use_gate:
            gate = self.g_proj(hidden_states).reshape(out.shape)
            out = self.o_norm(out, gate)
        else:
            out = self.o_norm(out)
        return self.o_proj(out.reshape(batch, length, -1))


TORCH_ACTIVATIONS: dict[str, Callable] = {
    "relu": F.relu, "sigmoid": torch.sigmoid, "logsigmoid": F.logsigmoid, "silu": F.silu, "swish": F.silu,
    "sqrelu": lambda x: F.relu(x).square(),
}
"""PyTorch forms of fla's ACT2FN entries (fla's own are Triton kernels for some names)."""


def activation(fla_function: Callable, x: torch.Tensor) -> torch.Tensor:
    """``fla_function`` (an entry of fla's ACT2FN) on CUDA tensors, its PyTorch form otherwise."""
    if x.is_cuda:
        return fla_function(x)
    name = next((name for name, function in FLA_ACT2FN.items() if function == fla_function), None)
    if name not in TORCH_ACTIVATIONS:
        raise NotImplementedError(f"no CPU path for fla's activation {name or fla_function!r}")
    return TORCH_ACTIVATIONS[name](x)
