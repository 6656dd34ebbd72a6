"""Kernel launches in one prefill of each family's source (its stock class) and its pruned model (the shipped code),
counted on the CPU: a proxy, needing no GPU, for the host-bound prefills of small models, where each launch costs the
host its Python and dispatch path.

    TRITON_INTERPRET=1 python scripts/count_launches.py [--families qwen3_5,gla] [--length 80] [--detail] [--public]
        [--channels]

Each family's tiny model (``tests/emulated_cuda.py``: heads of 16, the uneven plan, bfloat16) runs on its CUDA path
under Triton's interpreter, as the emulated CUDA tests run it: the source (the unpruned weights in the stock class,
transformers' or fla's), the same weights in the shipped class (``unpruned``), the pruned model, and with
``--public`` the pruned model through fla's public chunked functions instead of the direct forwards
(``pruned_public``), and with ``--channels`` a model pruned by the same heads and 6 of each key head's 16
query/key channels (``pruned_channels``; not Kimi Linear, whose layers cannot hold fewer, nor DeltaNet, whose tiny
model's heads have 8). One prefill of 2 x LENGTH tokens (``logits_to_keep=1``, no padding) warms each model up, and
the next is counted:

- ``triton``: launches of Triton kernels (fla's, the shipped row kernels);
- ``torch``: PyTorch operators that launch a kernel on a GPU (every operator but views and uninitialised
  allocations; on a GPU a matrix product may launch more than one kernel, and an operator on a tensor the code keeps
  on the host launches none, which the CPU cannot tell apart; and some CPU operators lay their results out
  otherwise than their CUDA forms, e.g. ``logsigmoid`` returns contiguous memory where CUDA's keeps its input's
  strides, so that a later copy runs here that a GPU skips);
- ``syncs``: operators that make a GPU's host wait (``.item()``, ``nonzero``, a boolean mask's indexing and the
  like; ``.tolist()``, ``.cpu()`` and ``.numpy()`` call no operator on a CPU tensor and are not seen);
- ``python_calls``: Python functions the host enters in a third prefill, counted apart (the counting above runs
  Python of its own), outside the interpreter's execution of Triton kernels (a GPU's host only launches them).

The counted prefill is the second of its shape, as in a warm benchmark: what fla derives from a tensor once and caches
by its identity (e.g. chunk indices from ``cu_seqlens``, where none are passed) is not counted.

Each family is counted in a process of its own (in one process, caches an earlier family filled, fla's and
``_sequence_index``'s, evict what a later one would reuse, and its counts rise). Printed as measured, one JSON line
per family; ``--detail`` adds the operators and kernels whose counts differ from the source's. The GPU's profiler
counts what a GPU launches (``check_families_gpu.py``'s speed phase) and times it; this counts what the code asks
for, and runs anywhere. It does not time the host: on the CPU, PyTorch's operators compute, and on the meta device
their shape functions run instead, neither as a GPU's host spends its time.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

FAMILIES = ["qwen3_5", "qwen3_next_moe", "qwen3_5_moe", "olmo_hybrid", "kimi_linear", "gated_deltanet_gva",
            "gated_deltanet", "delta_net", "gla", "kda_gva"]
NO_LAUNCH = {"empty.memory_format", "empty_strided.default", "new_empty.default", "new_empty_strided.default",
             "empty_like.default", "lift_fresh.default", "_unsafe_view.default", "sym_size.int", "sym_stride.int",
             "sym_numel.default", "sym_storage_offset.default", "promote_types.default", "is_same_size.default",
             "resize_.default", "set_.source_Storage_storage_offset", "record_stream.default", "as_strided_.default",
             "squeeze_.default", "squeeze_.dim", "unsqueeze_.default", "t_.default", "transpose_.default",
             "detach_.default"}
"""Operators that allocate without writing or only change or read metadata (views are found by their schema)."""
SYNCS = {"_local_scalar_dense.default", "nonzero.default", "equal.default", "masked_select.default",
         "_unique2.default", "unique_dim.default", "unique_consecutive.default", "bincount.default"}
"""Operators after which a GPU's host waits for the device (``waits`` adds those that do for some arguments)."""


def waits(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether the operator ``name`` (``SYNCS``' form) called with ``args`` and ``kwargs`` makes the host wait: those
    of ``SYNCS``, ``repeat_interleave`` by a tensor of counts without ``output_size``, indexing by a boolean mask."""
    import torch

    if name in SYNCS:
        return True
    if name == "repeat_interleave.Tensor":
        return kwargs.get("output_size") is None
    if name in ("index.Tensor", "index_put.default", "index_put_.default"):
        return any(isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in args[1])
    return False


class Launches:
    """What one prefill asks a GPU to do: ``torch`` (operators, by name), ``triton`` (kernels, by name) and
    ``syncs`` (operators, by name); and ``python_calls``, the Python functions the host entered."""

    def __init__(self):
        self.torch, self.triton, self.syncs = collections.Counter(), collections.Counter(), collections.Counter()
        self.python_calls = 0

    def totals(self) -> dict[str, int]:
        return {"triton": sum(self.triton.values()), "torch": sum(self.torch.values()),
                "syncs": sum(self.syncs.values()), "python_calls": self.python_calls}


@contextlib.contextmanager
def counting(launches: Launches):
    """Inside, every PyTorch operator and Triton launch is added to ``launches`` (the operators the interpreter runs
    to execute a Triton kernel on the CPU are not)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
    from triton.runtime import interpreter

    class Counting(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = f"{func._schema.name.split('::')[-1]}.{func._overloadname}"
            if waits(name, args, kwargs or {}):
                launches.syncs[name] += 1
            elif not (func.is_view or name in NO_LAUNCH):
                launches.torch[name] += 1
            return func(*args, **(kwargs or {}))

    run = interpreter.InterpretedFunction.run

    def counted_run(self, *args, **kwargs):
        launches.triton[self.fn.__name__] += 1
        with _disable_current_modes():
            return run(self, *args, **kwargs)

    interpreter.InterpretedFunction.run = counted_run
    try:
        with Counting(), torch.no_grad():
            yield
    finally:
        interpreter.InterpretedFunction.run = run


@contextlib.contextmanager
def counting_python_calls(launches: Launches):
    """Inside, every Python function entered adds one to ``launches.python_calls``, except within the interpreter's
    execution of a Triton kernel."""
    from triton.runtime import interpreter

    run = interpreter.InterpretedFunction.run

    def uncounted_run(self, *args, **kwargs):
        sys.setprofile(None)  # the interpreter's Python would also slow down under the profile function
        try:
            return run(self, *args, **kwargs)
        finally:
            sys.setprofile(profile)

    def profile(frame, event, arg):
        if event == "call":
            launches.python_calls += 1

    interpreter.InterpretedFunction.run = uncounted_run
    sys.setprofile(profile)
    try:
        yield
    finally:
        sys.setprofile(None)
        interpreter.InterpretedFunction.run = run


class WithPublicFunctions:
    """A model whose forward takes fla's public chunked functions where it would take the direct forwards."""

    def __init__(self, model):
        self.model, self.config = model, model.config

    def __call__(self, *args, **kwargs):
        import importlib

        import emulated_cuda

        modules = [importlib.import_module(f"compressor.modeling.{name}") for name in emulated_cuda.RECURRENCES]
        saved = [module.direct for module in modules]
        for module in modules:
            module.direct = lambda x, forward: False
        try:
            return self.model(*args, **kwargs)
        finally:
            for module, direct in zip(modules, saved):
                module.direct = direct


def models(name: str, channels: bool = False) -> tuple[dict, int]:
    """({"source": the source in its stock class, "unpruned": the source in the shipped class, "pruned": the pruned
    model, with ``channels`` "pruned_channels": pruned by the same heads and query/key channels, where its heads have
    more than it keeps}, all bfloat16 and in eval mode; the number of linear-attention layers)."""
    import copy

    import emulated_cuda
    import torch
    from test_key_channels import random_channels

    from compressor.families import family_for
    from compressor.key_channels import kept_key_dim
    from compressor.layers import PruningPlan, linear_layers
    from compressor.slicing import slim, stock_base

    pruned, kept, _ = emulated_cuda.tiny(name)
    stock = stock_base(type(pruned))
    source = stock(pruned.config)
    source.load_state_dict(pruned.state_dict())
    unpruned = copy.deepcopy(pruned)
    variants = dict(source=source, unpruned=unpruned, pruned=pruned)
    family, kept_channels = family_for(pruned.config), kept_key_dim(16, 0.4)
    if (channels and family.key_channels_refused is None
            and all(mixer.head_k_dim > kept_channels for mixer in linear_layers(pruned, family).values())):
        variants["pruned_channels"] = copy.deepcopy(pruned)
        plan = PruningPlan(kept=kept)
        plan.channels = random_channels(pruned, kept_channels)
        slim(variants["pruned_channels"], family, plan)
    slim(pruned, family, PruningPlan(kept=kept))
    for model in variants.values():
        model.to(torch.bfloat16).eval()
    for model in list(variants.values())[1:]:
        for mixer in linear_layers(model, family_for(model.config)).values():
            mixer.use_decode_graph = False
    return variants, len(kept)


def count(model, ids) -> Launches:
    """The launches of the second of three prefills of ``ids`` on the emulated CUDA path, and the Python calls of
    the third."""
    import emulated_cuda
    import torch

    launches = Launches()
    with emulated_cuda.cuda_path():
        with counting(Launches()):  # warm-up: kept decays, chosen configurations
            model(ids, logits_to_keep=1)
        with counting(launches):
            model(ids, logits_to_keep=1)
        with torch.no_grad(), counting_python_calls(launches):
            model(ids, logits_to_keep=1)
    return launches


def difference(pruned: collections.Counter, source: collections.Counter) -> dict[str, int]:
    return {key: pruned[key] - source[key] for key in sorted(pruned.keys() | source.keys())
            if pruned[key] != source[key]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    parser.add_argument("--length", type=int, default=80, help="prompt tokens (over 64: fla's layers chunk)")
    parser.add_argument("--detail", action="store_true", help="the operators and kernels whose counts differ")
    parser.add_argument("--public", action="store_true",
                        help="also the pruned model through fla's public functions (pruned_public), not the direct "
                             "forwards beneath their wrappers")
    parser.add_argument("--channels", action="store_true",
                        help="also a model pruned by query/key channels besides the heads (pruned_channels)")
    args = parser.parse_args()
    unknown = sorted(set(args.families.split(",")) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown families {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    if os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("run under TRITON_INTERPRET=1 (Triton's interpreter runs fla's kernels on the CPU)")
    families = args.families.split(",")
    if len(families) > 1:  # caches of an earlier family (fla's, ``_sequence_index``'s) would be evicted: raise counts
        for name in families:  # the last --families given is the one argparse keeps
            child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--families", name])
            if child.returncode:
                sys.exit(f"counting {name} failed (exit status {child.returncode}; its error is above)")
        return
    from transformers.integrations import hub_kernels

    hub_kernels._PACKAGE_SUPPORTED_DEVICES["fla"] += ("cpu",)  # the stock classes call fla, as on a GPU
    import torch

    for name in families:
        variants, layers = models(name, channels=args.channels)
        if args.public:
            variants["pruned_public"] = WithPublicFunctions(variants["pruned"])
        vocabulary = min(variants["source"].config.vocab_size, 96)
        ids = torch.randint(3, vocabulary, (2, args.length), generator=torch.Generator().manual_seed(0))
        counts = {variant: count(model, ids) for variant, model in variants.items()}
        line = {"family": name, "linear_layers": layers, "source_class": type(variants["source"]).__name__,
                **{variant: launches.totals() for variant, launches in counts.items()}}
        if args.detail:
            for variant in list(variants)[1:]:
                line[f"{variant}_minus_source"] = {
                    what: difference(getattr(counts[variant], what), getattr(counts["source"], what))
                    for what in ("triton", "torch", "syncs")}
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
