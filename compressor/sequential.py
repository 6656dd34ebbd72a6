"""Run calibration windows through a model one decoder layer at a time, for models that do not fit in memory.

The model is built with accelerate's ``init_empty_weights`` (parameters on the meta device, buffers such as rotary
frequencies real). A first pass with every decoder layer replaced by a recorder captures what the model's own
forward hands each layer (position embeddings, the mask of its layer type, position ids): they depend on the token
positions only, not on the hidden states. Then, layer after layer, the layer's weights are read from the source's
safetensors files onto the device (through transformers' own loading, with its weight conversions), every window's
hidden states go through it, and its weights go back to the meta device. The arithmetic of each layer is the
whole-model forward's, so the states (and their statistics) are the same.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .errors import CompressorError
from .streaming import source_index


def memory_budget(device: torch.device, max_gpu_memory: str | None, max_cpu_memory: str | None) -> int | None:
    """Bytes the compute device may hold (``--max-gpu-memory`` on a GPU, ``--max-cpu-memory`` on the CPU), or None."""
    from huggingface_hub.serialization._base import parse_size_to_int

    limit = max_gpu_memory if device.type == "cuda" else max_cpu_memory
    return None if limit is None else parse_size_to_int(limit)


def weights_bytes(folder: Path, save_dtype: torch.dtype, compute_dtype: torch.dtype) -> int:
    """Bytes the weights of ``folder`` take in ``compute_dtype`` (their files' size, scaled from ``save_dtype``)."""
    stored = sum(file.stat().st_size for file in folder.glob("*.safetensors"))
    return stored * compute_dtype.itemsize // save_dtype.itemsize


class _Recorded(Exception):
    """Raised by the recorders once the last needed layer's inputs are recorded."""


class _Recorder(nn.Module):
    """Stands in for decoder layer ``index``: records the arguments it is called with, returns the hidden states."""

    def __init__(self, index: int, calls: dict[int, tuple], last: int):
        super().__init__()
        self.index, self.calls, self.last = index, calls, last

    def forward(self, hidden_states, *args, **kwargs):
        self.calls[self.index] = (hidden_states if self.index == 0 else None, args, kwargs)
        if self.index == self.last:
            raise _Recorded
        return hidden_states


def layer_prefix(index: int, available: dict[str, Path]) -> str:
    """The checkpoint prefix of decoder layer ``index`` (a vision-language checkpoint's text layers included)."""
    for prefix in (f"model.layers.{index}.", f"model.language_model.layers.{index}."):
        if any(name.startswith(prefix) for name in available):
            return prefix
    raise CompressorError(f"the source checkpoint holds no tensors of layer {index}.")


class LayerByLayer:
    """Pushes token windows through ``model`` (of ``family``, built by ``init_empty_weights``; weights in ``source``)
    layer by layer
    on ``device`` in ``dtype``. Between layers the hidden states [B, L, D] of every window wait on the device when
    they fit in ``memory`` bytes beside the largest layer, else on the CPU."""

    def __init__(self, model: nn.Module, family, source: Path, device: torch.device, dtype: torch.dtype,
                 memory: int):
        self.model, self.family, self.source = model, family, source
        self.device, self.dtype, self.memory = device, dtype, memory
        self.hidden_device = device
        self.available = source_index(source)

    def largest_layer(self) -> int:
        """Bytes of the largest decoder layer's parameters in the compute dtype."""
        largest = max(sum(p.numel() for p in layer.parameters()) for layer in self.model.model.layers)
        return largest * self.dtype.itemsize

    def load(self, module_prefix: str, checkpoint_prefixes: tuple[str, ...]) -> None:
        """Read the tensors under ``checkpoint_prefixes`` into the model's parameters under ``module_prefix`` on the
        device, converted as ``from_pretrained`` converts them."""
        from safetensors import safe_open
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        names = [name for name in self.available if name.startswith(checkpoint_prefixes)]
        config = LoadStateDictConfig(device_map={"": self.device}, dtype=self.dtype,
                                     dtype_plan=self.model._get_dtype_plan(self.dtype),  # float32 where it keeps it
                                     weight_mapping=get_model_conversion_mapping(self.model))
        cuda = self.device.type == "cuda"
        # transformers' loader copies tensors to the device in worker threads, on the device's default stream, while
        # calibration runs on a side stream of its own: wait for the kernels still reading the last layer's weights
        # (whose freed blocks the copies may reuse), load on the default stream (the worker threads' stream, so the
        # fused experts are made in order), and wait for the copies before any kernel reads them.
        if cuda:
            torch.cuda.synchronize(self.device)
        with contextlib.ExitStack() as files:  # lazy slices: each tensor is read once, where it goes
            if cuda:
                files.enter_context(torch.cuda.stream(torch.cuda.default_stream(self.device)))
            handles = {file: files.enter_context(safe_open(file, "pt")) for file in {self.available[n] for n in names}}
            slices = {name: handles[self.available[name]].get_slice(name) for name in names}
            convert_and_load_state_dict_in_model(self.model, slices, config)
        if cuda:
            torch.cuda.synchronize(self.device)
        module = self.model.get_submodule(module_prefix.rstrip("."))
        missing = [name for name, p in module.named_parameters() if p.device.type == "meta"]
        if missing:
            raise CompressorError(f"the source checkpoint lacks {module_prefix}{missing[0]}.")

    def unload(self, module: nn.Module) -> None:
        """Give the module's weights back (parameters to the meta device)."""
        for submodule in module.modules():
            for name, parameter in list(submodule._parameters.items()):
                if parameter is not None:
                    submodule._parameters[name] = nn.Parameter(parameter.to("meta"), requires_grad=False)

    @torch.no_grad()
    def run(self, batches: list[torch.Tensor], last_layer: int, before_batch: Callable[[int], None],
            stop: type[Exception], edit: Callable[[int], None] | None = None) -> list[torch.Tensor]:
        """Every batch [B, L] of token ids through decoder layers 0 … ``last_layer``; ``before_batch(k)`` is called
        before batch k enters a layer; ``stop``, raised by a layer (the calibration sink after the last state), ends
        that batch's pass through it; ``edit(index)`` may change layer ``index`` once its weights are loaded.
        Returns each batch's hidden states [B, L, D] after the last layer it went through."""
        inner = self.model.model
        hidden_bytes = sum(b.numel() for b in batches) * self.model.config.hidden_size * self.dtype.itemsize
        fits = hidden_bytes + self.largest_layer() <= self.memory
        self.hidden_device = self.device if fits else torch.device("cpu")
        self.load("model.embed_tokens.", ("model.embed_tokens.", "model.language_model.embed_tokens."))
        layers, originals = inner.layers, list(inner.layers)
        hidden, calls = [], []
        for batch in batches:
            recorded: dict[int, tuple] = {}
            for index in range(last_layer + 1):
                layers[index] = _Recorder(index, recorded, last_layer)
            try:
                with contextlib.suppress(_Recorded):
                    inner(input_ids=batch.to(self.device), use_cache=False)
            finally:
                for index in range(last_layer + 1):
                    layers[index] = originals[index]
            hidden.append(recorded[0][0].to(self.hidden_device))
            calls.append({index: call[1:] for index, call in recorded.items()})
        self.unload(inner.embed_tokens)
        for index in range(last_layer + 1):
            self.load(f"model.layers.{index}.", (layer_prefix(index, self.available),))
            if edit is not None:
                edit(index)
            for k in range(len(batches)):
                before_batch(k)
                args, kwargs = calls[k][index]
                try:
                    output = layers[index](hidden[k].to(self.device), *args, **kwargs)
                except stop:
                    continue
                hidden[k] = (output[0] if isinstance(output, tuple) else output).to(self.hidden_device)
            self.unload(layers[index])
        self.model.tie_weights()  # loading and unloading the embeddings replaced their parameter
        return hidden

    @torch.no_grad()
    def final_hidden(self, batches: list[torch.Tensor], edit: Callable[[int], None] | None = None
                     ) -> list[torch.Tensor]:
        """Each batch's [B, L] hidden states [B, L, D] after every layer and the final norm (what the output head
        reads), on the device."""
        hidden = self.run(batches, len(self.model.model.layers) - 1, lambda k: None, _NeverRaised, edit)
        self.load("model.norm.", ("model.norm.", "model.language_model.norm."))
        normed = [self.model.model.norm(h.to(self.device)) for h in hidden]
        self.unload(self.model.model.norm)
        return normed

    @contextlib.contextmanager
    def head(self):
        """The output head with its weights on the device, within the block (the embeddings', when tied)."""
        head = self.model.get_output_embeddings()
        if "lm_head.weight" in self.available:
            self.load("lm_head.", ("lm_head.",))
        else:
            self.load("model.embed_tokens.", ("model.embed_tokens.", "model.language_model.embed_tokens."))
            self.model.tie_weights()
        try:
            yield self.model.get_output_embeddings()
        finally:
            self.unload(head)
            self.unload(self.model.model.embed_tokens)
            self.model.tie_weights()


class _NeverRaised(Exception):
    """No layer raises it: every batch goes through every layer."""
