"""The second axis: which query/key channels each key head keeps (Nazari & Rusch, arXiv 2602.04852).

Every key head keeps the same number of channels, ⌈(1 − R)·d_k⌉, and the same subset for its queries and its
keys, so q·k stays a dot product over kept channels and each state shrinks to d_k' × d_v. The subsets are chosen
per key head by one of ``KEY_METHODS``:

- ``rrqr``: strong rank-revealing QR (``compressor.rrqr``) of the head's calibration activations M [≤ 5000, d_k]
  (queries and keys as rows, as the recurrence receives them: after the short convolution and its activation,
  before the L2 normalisation the kernels apply);
- ``l1``: the L1 norm of the channel's query and key projection rows;
- ``wanda``: Σ |W_ij|·‖x_j‖ over those rows, ‖x_j‖ the norm of the layer's input feature j on calibration text;
- ``taylor``: a first-order (Taylor) estimate of the loss change from removing the channel, Σ over calibration
  batches of |∂L/∂m| for a multiplicative mask m = 1 on the channel's queries and keys (backward passes through
  the PyTorch recurrences);
- ``random``: seeded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .errors import CompressorError
from .families import Family
from .families.base import key_channel_rows
from .layers import head_layout, linear_layers
from .rrqr import strong_rrqr
from .settings import KEY_METHODS

MAX_ROWS = 5000
"""Activation rows per key head that ``rrqr`` factors (queries and keys together), as the paper subsamples."""


def kept_key_dim(key_dim: int, reduction: float) -> int:
    """Channels kept per key head: ⌈(1 − reduction)·d_k⌉ (the product rounded to 1e-9 first, so that 0.5 of 32
    keeps 16)."""
    return max(1, math.ceil(round((1.0 - reduction) * key_dim, 9)))


@dataclass
class KeyActivations:
    rows: dict[int, dict[int, torch.Tensor]]
    """Layer -> key head -> [≤ MAX_ROWS, d_k] float64 query and key rows."""
    input_norms: dict[int, torch.Tensor]
    """Layer -> [D] L2 norm of each feature of the mixer's input over the calibration tokens."""
    gradients: dict[int, torch.Tensor] | None = None
    """Layer -> [H_k, d_k] ``taylor``'s scores (``channel_gradients``), when it is asked for."""


def collect_key_activations(model: nn.Module, family: Family, windows: torch.Tensor, batch_size: int,
                            seed: int = 0, max_rows: int = MAX_ROWS) -> KeyActivations:
    """Run ``windows`` [N, L] through ``model`` and keep, per key head, a seeded random subset of its query and key
    rows (as many tokens from every batch), and the norms of each mixer's input features."""
    mixers = linear_layers(model, family)
    batches = math.ceil(windows.shape[0] / batch_size)
    per_batch = math.ceil(max_rows / 2 / batches)
    generator = torch.Generator().manual_seed(seed)
    rows: dict[int, dict[int, list[torch.Tensor]]] = {i: {} for i in mixers}
    squares: dict[int, torch.Tensor] = {}

    def capture(layer: int, mixer: nn.Module, inner):
        first_value = {key: mixer.value_to_key.index(key) for key in range(mixer.num_k_heads)}

        def recurrence(q, k, *args, **kwargs):
            tokens = q.shape[0] * q.shape[1]
            pick = torch.randperm(tokens, generator=generator)[:per_batch].to(q.device)
            for key, value in first_value.items():
                for x in (q, k):
                    head = x[:, :, value].reshape(tokens, -1).index_select(0, pick)
                    rows[layer].setdefault(key, []).append(head.detach().to("cpu", torch.float64))
            return inner(q, k, *args, **kwargs)

        return recurrence

    def input_hook(layer: int):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            total = hidden.detach().float().square().sum(dim=(0, 1)).cpu().double()
            squares[layer] = squares.get(layer, 0) + total

        return hook

    handles = [mixer.register_forward_pre_hook(input_hook(i), with_kwargs=True) for i, mixer in mixers.items()]
    for layer, mixer in mixers.items():
        mixer.recurrence = capture(layer, mixer, mixer.recurrence)
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            for start in range(0, windows.shape[0], batch_size):
                model(windows[start : start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()
        for mixer in mixers.values():
            mixer.__dict__.pop("recurrence", None)
    return KeyActivations(
        rows={i: {key: torch.cat(parts)[:max_rows] for key, parts in heads.items()} for i, heads in rows.items()},
        input_norms={i: total.sqrt() for i, total in squares.items()},
    )


def channel_gradients(model: nn.Module, family: Family, windows: torch.Tensor,
                      batch_size: int) -> dict[int, torch.Tensor]:
    """Layer -> [H_k, d_k] float64: Σ over batches of ``windows`` [N, L] of |∂L/∂m|, L the batch's mean next-token
    loss and m a multiplicative mask of ones on each query/key channel of each key head (in every value head that
    reads it; each mask on its layer's device). Backward passes go through the PyTorch recurrences
    (``recurrences.torch_recurrences``: fla 0.6's backward kernels are refused on some GPUs); the weights take no
    gradient. The output head runs 512 positions at a time (``evaluation.losses_of_hidden``), though the backward
    pass keeps every chunk's float32 logits."""
    from .evaluation import losses_of_hidden
    from .recurrences import torch_recurrences
    from .selection import channel_masks

    mixers = linear_layers(model, family)
    masks = {i: torch.ones(m.num_k_heads, m.head_k_dim, device=m.out_proj.weight.device, requires_grad=True)
             for i, m in mixers.items()}
    totals = {i: torch.zeros(m.num_k_heads, m.head_k_dim, dtype=torch.float64) for i, m in mixers.items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    device = model.get_input_embeddings().weight.device
    try:
        for parameter in trainable:
            parameter.requires_grad_(False)
        with channel_masks(model, family, masks), torch_recurrences(), torch.enable_grad():
            for start in range(0, windows.shape[0], batch_size):
                ids = windows[start : start + batch_size].to(device)
                hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
                loss = losses_of_hidden(model.get_output_embeddings(), hidden, ids).mean()
                for layer, grad in zip(masks, torch.autograd.grad(loss, list(masks.values()))):
                    totals[layer] += grad.abs().to("cpu", torch.float64)
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
    return totals


def channel_scores(mixer: nn.Module, family: Family, method: str, input_norm: torch.Tensor | None) -> torch.Tensor:
    """[H_k, d_k] score of every channel of every key head by its query/key projection rows (``l1``, ``wanda``)."""
    heads = head_layout(mixer)
    state = mixer.state_dict()
    scores = torch.zeros(heads.num_key_heads, heads.key_dim, dtype=torch.float64)
    for name in family.query_key:
        weight = state[name].detach().to("cpu", torch.float64).abs()
        if method == "wanda":
            weight = weight * input_norm
        for key, blocks in key_channel_rows(family.tensors[name], heads).items():
            for block in blocks:
                scores[key] += weight[block].sum(dim=1)
    return scores


def choose_channels(model: nn.Module, family: Family, method: str, kept_dim: int, kept_keys: dict[int, list[int]],
                    activations: KeyActivations | None = None, seed: int = 0) -> dict[int, dict[int, list[int]]]:
    """Layer -> kept key head -> its ``kept_dim`` channels (sorted), for the key heads ``kept_keys`` keeps
    (layer -> key heads). ``activations`` is needed by ``rrqr`` and ``wanda``, and with its gradients by
    ``taylor``."""
    if method not in KEY_METHODS:
        raise ValueError(f"unknown key method {method!r}")
    chosen: dict[int, dict[int, list[int]]] = {}
    for layer, mixer in linear_layers(model, family).items():
        if method in ("l1", "wanda"):
            norm = activations.input_norms[layer] if method == "wanda" else None
            scores = channel_scores(mixer, family, method, norm)
        elif method == "taylor":
            scores = activations.gradients[layer]
        chosen[layer] = {}
        for key in kept_keys[layer]:
            if method == "rrqr":
                picked = strong_rrqr(activations.rows[layer][key], kept_dim).order[:kept_dim]
            elif method == "random":
                generator = torch.Generator().manual_seed(seed * 1_000_003 + layer * 1009 + key)
                picked = torch.randperm(mixer.head_k_dim, generator=generator)[:kept_dim].tolist()
            else:
                picked = scores[key].argsort(descending=True, stable=True)[:kept_dim].tolist()
            chosen[layer][key] = sorted(picked)
    return chosen


def check_key_reduction(family: Family, mixers: dict[int, nn.Module], reduction: float) -> int:
    """The channels every key head keeps under ``reduction``; a CompressorError when this family or model cannot
    lose query/key channels exactly, or its layers differ in d_k (the count is global)."""
    if family.key_channels_refused is not None:
        raise CompressorError(f"cannot remove query/key channels of {family.name}: {family.key_channels_refused}.")
    dims = sorted({mixer.head_k_dim for mixer in mixers.values()})
    if len(dims) != 1:
        raise CompressorError(f"--key-reduction keeps one channel count in every key head, but this model's layers "
                              f"have key heads of {', '.join(map(str, dims))} channels.")
    return kept_key_dim(dims[0], reduction)


def heads_share(state_reduction: float, kept_fraction: float) -> float:
    """The share of the channel-reduced state that removing heads must take so that both axes together remove
    ``state_reduction`` of the state (channels keep ``kept_fraction`` of it)."""
    share = 1.0 - (1.0 - state_reduction) / kept_fraction
    if share <= 0.0:
        raise CompressorError(f"--key-reduction alone removes {1 - kept_fraction:.1%} of the state, already at least "
                              f"--state-reduction {state_reduction}; drop --state-reduction to remove channels only.")
    return share
