"""Write a pruned checkpoint's weights straight from the source's safetensors files, one output shard at a time,
without building the model: a per-head tensor is read with ``safe_open`` in the row or column runs of the heads
kept, and every other tensor (embeddings, experts, full-attention layers) is copied byte for byte from its source
file into the shard.

The output holds what ``save_pretrained`` writes for the pruned model (``compressor.export.write_model``): the same
tensor names (transformers' conversions reverted, tied weights once), the same shards and index, the same tensor
bytes. Memory holds the sliced tensors of one output shard at most.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from .errors import CompressorError
from .export import parameter_dtypes
from .families import Family, kept_indices
from .layers import PruningPlan, head_layout, linear_layers
from .slicing import slim

VISION_LANGUAGE_PREFIX = ("model.", "model.language_model.")
"""A vision-language checkpoint holds its text model's ``model.X`` as ``model.language_model.X``."""


@dataclass(frozen=True)
class Slice:
    """Keep ``indices`` (sorted) along ``axis`` of a source tensor."""

    axis: int
    indices: tuple[int, ...]

    def runs(self) -> list[tuple[int, int]]:
        """The indices as [start, stop) runs of consecutive entries."""
        runs: list[tuple[int, int]] = []
        for index in self.indices:
            if runs and runs[-1][1] == index:
                runs[-1] = (runs[-1][0], index + 1)
            else:
                runs.append((index, index + 1))
        return runs


def head_slices(model: nn.Module, family: Family, plan: PruningPlan) -> dict[str, Slice]:
    """Full parameter name -> the entries ``plan`` keeps, for every per-head tensor of the (unpruned) ``model``'s
    linear-attention mixers; shapes only, so ``model`` may live on the meta device."""
    slices = {}
    for index, mixer in linear_layers(model, family).items():
        layout = head_layout(mixer)
        prefix = f"model.layers.{index}.{family.mixer_attr}."
        for name in mixer.state_dict():
            if name in family.tensors:
                table = family.tensors[name]
                indices, _ = kept_indices(table, layout, plan.kept[index], plan.channels.get(index))
                slices[prefix + name] = Slice(table.axis, tuple(indices))
    return slices


def output_tensors(pruned: nn.Module, save_dtype: torch.dtype, buffer_dtypes: dict[str, torch.dtype]
                   ) -> dict[str, torch.Tensor]:
    """The meta tensors ``save_pretrained`` would write for ``pruned`` (a meta model): tied weights once, the
    family's weight conversions reverted (per-expert tensors, original names), floating parameters in
    ``save_dtype`` (float32 where the class keeps them so: ``export.parameter_dtypes``) and buffers in
    ``buffer_dtypes`` (their dtype in the source files)."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    parameters = {name for name, _ in pruned.named_parameters(remove_duplicate=False)}
    dtype_of = parameter_dtypes(pruned, save_dtype)
    state = {}
    for name, tensor in pruned.state_dict().items():
        if name not in parameters:
            dtype = buffer_dtypes.get(name, tensor.dtype)
        else:
            dtype = dtype_of(name) if tensor.is_floating_point() else tensor.dtype
        state[name] = torch.empty(tensor.shape, dtype=dtype, device="meta")
    state = remove_tied_weights_from_state_dict(state, pruned)
    return revert_weight_conversion(pruned, state)


def shards_of(tensors: dict[str, torch.Tensor], max_shard_size: str):
    """huggingface_hub's split of ``tensors`` into shards, as ``save_pretrained`` gets it for real tensors: views of
    one storage (the per-expert tensors a reverted conversion cuts from one fused tensor) share a shard and count
    once, at the size of their storage (huggingface_hub cannot tell that for meta tensors by itself)."""
    from huggingface_hub.serialization._base import split_state_dict_into_shards_factory

    return split_state_dict_into_shards_factory(
        tensors, get_storage_size=lambda t: t.untyped_storage().nbytes(),
        get_storage_id=lambda t: id(t._base if t._base is not None else t),
        filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)


def source_index(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file of ``folder`` that holds it (from the files' headers)."""
    where = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            where.update({name: file for name in handle.keys()})
    return where


def source_name(name: str, available: dict[str, Path]) -> str:
    """The source's name for the output tensor ``name`` (the text model's, in a vision-language checkpoint)."""
    if name in available:
        return name
    old, new = VISION_LANGUAGE_PREFIX
    if name.startswith(old) and new + name[len(old):] in available:
        return new + name[len(old):]
    raise CompressorError(f"the source checkpoint has no tensor '{name}', so it cannot be exported shard by shard; "
                          "the in-memory export (--export memory) writes it.")


def read_tensor(file: Path, name: str, kept: Slice | None) -> torch.Tensor:
    """The tensor ``name`` of ``file``, only the ``kept`` entries along its axis when given (read run by run)."""
    with safe_open(file, "pt") as handle:
        if kept is None:
            return handle.get_tensor(name)
        part = handle.get_slice(name)
        before = (slice(None),) * kept.axis
        pieces = [part[(*before, slice(start, stop))] for start, stop in kept.runs()]
    return torch.cat(pieces, dim=kept.axis)


def attach_load_conversions(model: nn.Module, source_keys) -> None:
    """Record on ``model`` the weight conversions that loading a checkpoint with ``source_keys`` would apply (as
    ``from_pretrained`` records them), so that reverting them writes the names and order ``save_pretrained`` of
    a loaded model writes."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [entry for entry in mapping if isinstance(entry, WeightRenaming)]
    converters = [entry for entry in mapping if isinstance(entry, WeightConverter)]
    expected = model.state_dict()
    for key in source_keys:
        rename_source_key(key, renamings, converters, model.base_model_prefix, expected)
    model._weight_conversions = [entry for entry in mapping if entry.was_used()]


def check_streamable(model: nn.Module, family: Family) -> None:
    """Refuse a family whose checkpoint stores the mixers' tensors under other names or shapes than the model
    (transformers converts them at load time), since the family table describes the model's."""
    from transformers.core_model_loading import revert_weight_conversion

    index = min(linear_layers(model, family))
    prefix = f"model.layers.{index}.{family.mixer_attr}."
    mixer = {name: t for name, t in model.state_dict().items() if name.startswith(prefix)}
    reverted = revert_weight_conversion(model, dict(mixer))
    if {n: tuple(t.shape) for n, t in reverted.items()} != {n: tuple(t.shape) for n, t in mixer.items()}:
        renamed = sorted(set(reverted) - set(mixer))[:2]
        raise CompressorError(
            f"{family.name} checkpoints store the linear-attention tensors otherwise than the model holds them "
            f"({', '.join(n.removeprefix(prefix) for n in renamed) or 'other shapes'}), so they cannot be exported "
            "shard by shard; use --export memory."
        )


def write_weights(source: Path, loaded, plan: PruningPlan, folder: Path, max_shard_size: str = "2GB",
                  progress: bool = True) -> dict[str, str]:
    """Write the weights of ``source`` (a local folder of safetensors files) pruned by ``plan`` into ``folder``:
    ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` shards and ``model.safetensors.index.json``, as
    ``save_pretrained`` names them. ``loaded`` is the source's model on the meta device (``load_structure``); it is
    slimmed in place. Tensors that pass through unchanged are copied byte for byte from the source files, without
    entering memory; the others are read (their kept runs only), converted and written. Returns the weight map
    (tensor name -> file name)."""
    model, family = loaded.model, loaded.family
    available = source_index(source)
    attach_load_conversions(model, available)
    check_streamable(model, family)
    slices = head_slices(model, family, plan)
    slim(model, family, plan)
    layouts = {file: stored_layout(file) for file in set(available.values())}
    buffer_dtypes = {}
    for name, _ in model.named_buffers():
        original = source_name_or_none(name, available)
        if original is not None:
            buffer_dtypes[name] = SAFETENSORS_DTYPES[layouts[available[original]][original].dtype]
    tensors = output_tensors(model, loaded.save_dtype, buffer_dtypes)
    split = shards_of(tensors, max_shard_size)
    shards = split.filename_to_tensors.items()
    for file_name, names in tqdm(shards, desc="writing shards", unit="shard", disable=not progress):
        entries = []
        for name in names:
            original = source_name(name, available)
            stored, wanted = layouts[available[original]][original], tensors[name]
            if name not in slices and stored.shape == tuple(wanted.shape) and \
                    SAFETENSORS_DTYPES[stored.dtype] == wanted.dtype:
                entries.append((name, stored))
                continue
            tensor = read_tensor(available[original], original, slices.get(name))
            if tuple(tensor.shape) != tuple(wanted.shape):
                raise CompressorError(f"the source tensor '{original}' has shape {tuple(tensor.shape)}, the pruned "
                                      f"model expects {tuple(wanted.shape)}.")
            entries.append((name, tensor.to(wanted.dtype).contiguous()))
        write_shard(folder / file_name, entries, {"format": "pt"})
        del entries
    if split.is_sharded:
        index = {"metadata": {"total_parameters": model.num_parameters(), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n",
                                                             encoding="utf-8")
    return split.tensor_to_filename


@dataclass(frozen=True)
class StoredTensor:
    """Where a safetensors file keeps one tensor: its dtype code (``BF16``, …), shape and absolute byte range."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int


def stored_layout(file: Path) -> dict[str, StoredTensor]:
    """Tensor name -> where ``file`` stores it, from the header (8-byte little-endian length, then JSON)."""
    with open(file, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return {name: StoredTensor(file, entry["dtype"], tuple(entry["shape"]), 8 + length + entry["data_offsets"][0],
                               8 + length + entry["data_offsets"][1])
            for name, entry in header.items()}


def write_shard(path: Path, entries: list[tuple[str, StoredTensor | torch.Tensor]], metadata: dict[str, str]) -> None:
    """A safetensors file of ``entries`` in their order: a ``StoredTensor`` is copied byte for byte from its file
    (``os.copy_file_range`` where the system has it), a tensor [any shape] written from memory."""
    codes = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
    header, offset = {"__metadata__": metadata}, 0
    for name, entry in entries:
        if isinstance(entry, StoredTensor):
            code, shape, size = entry.dtype, list(entry.shape), entry.stop - entry.start
        else:
            code, shape, size = codes[entry.dtype], list(entry.shape), entry.numel() * entry.element_size()
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb", buffering=0) as out:  # unbuffered: copies and writes share the file's offset
        write_all(out, len(encoded).to_bytes(8, "little") + encoded)
        for _, entry in entries:
            if isinstance(entry, StoredTensor):
                copy_range(entry.file, entry.start, entry.stop - entry.start, out)
            elif entry.numel():
                write_all(out, entry.reshape(-1).view(torch.uint8).numpy().data)


def write_all(out, data) -> None:
    """Write every byte of ``data`` to the unbuffered file ``out`` (one system call writes at most about 2 GiB)."""
    view = memoryview(data)
    while view.nbytes:
        view = view[out.write(view):]


def copy_range(file: Path, start: int, length: int, out) -> None:
    """Append ``length`` bytes of ``file`` from ``start`` to the open unbuffered file ``out``."""
    with open(file, "rb") as source:
        try:
            while length:
                done = os.copy_file_range(source.fileno(), out.fileno(), length, start)
                if done == 0:
                    raise OSError("copy_file_range copied nothing")
                start, length = start + done, length - done
            return
        except (AttributeError, OSError):  # no copy_file_range here, or not between these files
            source.seek(start)
            out.seek(0, os.SEEK_END)
            while length:
                block = source.read(min(length, 2**24))
                write_all(out, block)
                length -= len(block)


def source_name_or_none(name: str, available: dict[str, Path]) -> str | None:
    try:
        return source_name(name, available)
    except CompressorError:
        return None


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
