"""The shipped forward's CUDA path, run on the CPU: ``python emulated_cuda.py MODEL LENGTH heads|channels DTYPE``
(float32 or bfloat16) prints one JSON line.

Triton's interpreter runs fla's kernels on CPU tensors (``triton_interpreter.run_fla_chunked_kernels``), and
every tensor reports ``is_cuda``, the shipped code's only test for its GPU path, so each layer takes the fla
functions a GPU would: packed heads, the direct chunked forwards, fla's decode steps and row kernels. What it cannot
show: CUDA graphs (decode graphs are switched off), streams, the tile configurations a GPU would choose (the first
candidate runs).

A tiny model of MODEL (heads of 16 channels) is pruned in place with the uneven plan of heads (and, for ``channels``,
10 of each key head's 16 query/key channels). Its masked copy runs the PyTorch path in float32; in bfloat16, where
the two paths round differently, it runs the CUDA path too. Printed: the largest logit differences of the pruned
model on the CUDA path from the masked copy (a prefill of all but the last token of a LENGTH-token prompt whose
second row is left-padded, without autograd in two calls, the second continuing from the first's cache, and with
autograd in one; each step of a greedy generation that starts from the cache of the prefill without autograd: the
prompt's last token, then two generated ones, all decode steps), whether the generated tokens are the same, the
logit scale, how many times a direct chunked forward was called without and with autograd, and how many layer calls
of the prefill ran in fla's own layout instead of packed heads (value heads that share key heads,
``packed_heads.key_heads_as_batch``; GLA's token-major layout,
``gla.token_major_gla``).

Before pruning, the shipped class and the stock class it extends (``slicing.stock_base``) run the model's unpruned
weights on the prompt's first row on the CUDA path, without autograd: printed under ``stock``, their largest logit
difference, the share of positions whose argmax agrees, and the calls of fla's own layout in the shipped prefill.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import os
import sys

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("run under TRITON_INTERPRET=1")

import tiny_fla  # noqa: E402 (after the check above: fla's kernels are made for the interpreter on import)
import tiny_hybrids  # noqa: E402
import tiny_models  # noqa: E402
import torch  # noqa: E402
from triton_interpreter import run_fla_chunked_kernels  # noqa: E402

from test_key_channels import channel_masked, random_channels  # noqa: E402

from compressor.families import family_for  # noqa: E402
from compressor.key_channels import kept_key_dim  # noqa: E402
from compressor.layers import PruningPlan, linear_layers  # noqa: E402
from compressor.slicing import slim, stock_base  # noqa: E402

for module in ("fla.ops.gla", "fla.ops.gated_delta_rule", "fla.ops.delta_rule", "fla.ops.kda"):
    importlib.import_module(module)
run_fla_chunked_kernels()

WIDE = dict(linear_key_head_dim=16, linear_value_head_dim=16)
PADDING = 7
"""Left padding of the prompt's second row."""
CONTINUED = 9
"""Tokens of the prefill's second call, which continues from the first's cache (the recurrences' initial states)."""
RECURRENCES = ("gated_delta", "gla", "delta_rule", "kda")
"""The shipped modules whose recurrence calls a direct chunked forward (``unwrapped_chunk``)."""


def tiny(name: str) -> tuple[torch.nn.Module, dict[int, list[int]], int]:
    """(a float32 tiny model of ``name`` with heads of 16, the uneven plan, its vocabulary size)."""
    if name in tiny_models.CONFIGS:
        return tiny_models.tiny_model(name, **WIDE), tiny_models.PLANS["uneven"], 96
    if name in tiny_hybrids.CONFIGS:
        tiny_hybrids.HYBRID.update(WIDE)
        fields = dict(linear_head_dim=16) if name == "kimi_linear" else {}
        return tiny_hybrids.tiny_hybrid(name, **fields), tiny_models.PLANS["uneven"], tiny_hybrids.VOCAB
    widths = dict(gla=dict(hidden_size=128), gated_deltanet_gva=dict(head_dim=16), kda_gva=dict(head_dim=16))
    return tiny_fla.tiny_fla_model(name, **widths.get(name, {})), tiny_fla.plans_for(name)["uneven"], 96


@contextlib.contextmanager
def counted_direct_forwards(counts: dict[str, int]):
    """Inside, each call of a direct chunked forward adds one to ``counts["no_grad"]`` or ``counts["grad"]``."""
    modules = [importlib.import_module(f"compressor.modeling.{name}") for name in RECURRENCES]
    originals = [module.unwrapped_chunk for module in modules]

    def counting(forward):
        def spy(*args, **kwargs):
            key = "grad" if torch.is_grad_enabled() else "no_grad"
            counts[key] = counts.get(key, 0) + 1
            return forward(*args, **kwargs)
        return spy

    for module, forward in zip(modules, originals):
        module.unwrapped_chunk = counting(forward)
    shared = [(modules[0], "key_heads_as_batch"), (modules[3], "key_heads_as_batch"),  # gated_delta, kda
              (importlib.import_module("compressor.modeling.modeling_fla_gla"), "token_major_gla")]
    shared_originals = [getattr(module, name) for module, name in shared]

    def counting_shared(pack):
        def spy(*args, **kwargs):
            counts["fla_layout"] = counts.get("fla_layout", 0) + 1
            return pack(*args, **kwargs)
        return spy

    for (module, name), pack in zip(shared, shared_originals):
        setattr(module, name, counting_shared(pack))
    try:
        yield
    finally:
        for module, forward in zip(modules, originals):
            module.unwrapped_chunk = forward
        for (module, name), pack in zip(shared, shared_originals):
            setattr(module, name, pack)


@contextlib.contextmanager
def cuda_path():
    """Inside, every tensor reports ``is_cuda`` and the CUDA calls the shipped code makes around its kernels are
    no-ops."""
    saved = torch.Tensor.is_cuda, torch.cuda.device, torch.cuda.is_current_stream_capturing
    torch.Tensor.is_cuda = property(lambda self: True)
    torch.cuda.device = lambda device: contextlib.nullcontext()
    torch.cuda.is_current_stream_capturing = lambda: False
    try:
        yield
    finally:
        torch.Tensor.is_cuda, torch.cuda.device, torch.cuda.is_current_stream_capturing = saved


def prefill_in_two(model: torch.nn.Module, prompt: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, object]:
    """(logits [B, T - 1, vocabulary], cache) of a prefill of all but the last token of ``prompt`` [B, T] (``mask``
    its attention mask) in two chunked calls, the second ``CONTINUED`` tokens from the first's cache."""
    split = prompt.shape[1] - 1 - CONTINUED
    first = model(input_ids=prompt[:, :split], attention_mask=mask[:, :split], use_cache=True)
    second = model(input_ids=prompt[:, split:-1], attention_mask=mask[:, :-1], past_key_values=first.past_key_values,
                   use_cache=True)
    return torch.cat([first.logits, second.logits], dim=1), second.past_key_values


def main(name: str, length: int, channels: bool, dtype: torch.dtype) -> dict:
    """The differences above for a prompt of ``length`` tokens whose second row is left-padded (the prefills take
    all but the last token, ``generate`` the rest from the cache); ``channels``: the plan also removes 6 of each key
    head's 16 query/key channels; ``dtype``: the models' (float32 or bfloat16)."""
    model, kept, vocabulary = tiny(name)
    prompt = torch.randint(3, vocabulary, (2, length), generator=torch.Generator().manual_seed(0))
    stock = against_stock(model, prompt[:1], dtype)  # one row: the pruned model below runs both
    plan = PruningPlan(kept=kept)
    if channels:
        plan.channels = random_channels(model, kept_key_dim(16, 0.4))
        masked = channel_masked(model, kept, plan.channels)
    else:
        masked = tiny_models.masked_copy(model, kept)
    slim(model, family_for(model.config), plan)
    for each in (model, masked):
        each.to(dtype)
        for mixer in linear_layers(each, family_for(each.config)).values():
            mixer.use_decode_graph = False
    mask = torch.ones_like(prompt)
    prompt[1, :PADDING], mask[1, :PADDING] = 0, 0
    settings = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, output_logits=True,
                    return_dict_in_generate=True, pad_token_id=0)
    real = mask[:, :-1].bool()  # logits are compared at the prompt's tokens, not at its padding
    start = dict(input_ids=prompt[:, :-1], attention_mask=mask[:, :-1])
    with cuda_path() if dtype == torch.bfloat16 else contextlib.nullcontext():
        expected_autograd = masked(**start).logits.detach().float()
        with torch.no_grad():
            expected, cache = prefill_in_two(masked, prompt, mask)
            reference = masked.generate(prompt, past_key_values=cache, **settings)
    counts = {}
    with cuda_path(), counted_direct_forwards(counts):
        with torch.no_grad():
            prefill, cache = prefill_in_two(model, prompt, mask)
            generated = model.generate(prompt, past_key_values=cache, **settings)
        no_grad = dict(counts)
        autograd = model(**start).logits.detach()  # fla's public functions
    expected = expected.float()
    return dict(
        model=name, layers=len(kept),
        prefill=(prefill.float() - expected)[real].abs().max().item(), scale=expected[real].abs().max().item(),
        autograd=(autograd.float() - expected_autograd)[real].abs().max().item(),
        same_tokens=torch.equal(generated.sequences, reference.sequences),
        steps=[(a - b).float().abs().max().item() for a, b in zip(generated.logits, reference.logits)],
        direct_without_grad=no_grad.get("no_grad", 0), direct_with_grad=counts.get("grad", 0),
        fla_layout=no_grad.get("fla_layout", 0), stock=stock,
    )


def against_stock(model: torch.nn.Module, prompt: torch.Tensor, dtype: torch.dtype) -> dict:
    """The shipped class's unpruned ``model`` against the stock class on its weights, both in ``dtype`` on the CUDA
    path: prompt [B, T] prefilled without autograd; ``model`` is left as it was."""
    shipped = copy.deepcopy(model).to(dtype)
    stock = stock_base(type(model))(model.config)
    stock.load_state_dict(model.state_dict())
    stock.to(dtype)
    counts = {}
    with cuda_path(), torch.no_grad():
        with counted_direct_forwards(counts):
            got = shipped(prompt).logits.float()
        expected = stock(prompt).logits.float()
    return dict(difference=(got - expected).abs().max().item(),
                same_argmax=(got.argmax(-1) == expected.argmax(-1)).float().mean().item(),
                fla_layout=counts.get("fla_layout", 0))


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]), channels=sys.argv[3] == "channels",
                          dtype=getattr(torch, sys.argv[4]))))
