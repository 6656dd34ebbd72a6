"""Load a model and its tokenizer from a local folder or a Hub id, after checking its family."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from .errors import CompressorError
from .model_source import locate_model
from .families import Family, family_for
from .families.fla_support import check_config as check_fla_config
from .families.fla_support import require_fla

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    family: Family
    source: str
    local_path: Path | None
    save_dtype: torch.dtype
    """The checkpoint's dtype: the pruned weights are written in it, whatever dtype computed them."""
    text_model_of: str | None = None
    """The checkpoint's vision-language class when ``model`` is its text model alone."""
    layer_by_layer: object | None = None
    """A ``compressor.sequential.LayerByLayer`` when ``model``'s weights stay on disk (parameters on the meta
    device) and it runs one decoder layer at a time."""


def resolve_device(device: str) -> torch.device:
    """'auto' picks the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise CompressorError(f"unknown device '{device}'.") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CompressorError(f"device '{device}' was asked for but no CUDA device is available.")
    return resolved


def resolve_dtype(dtype: str, checkpoint_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The compute dtype. 'auto' is the checkpoint's on a GPU and float32 on the CPU, where bf16/fp16 matrix
    products and convolutions are an order of magnitude slower."""
    if dtype == "auto":
        return checkpoint_dtype if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise CompressorError(f"unknown dtype '{dtype}'; choose auto, {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def checkpoint_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def as_family_class(model: nn.Module, family: Family) -> nn.Module:
    """``model`` (a stock class of the family's architecture) rebuilt as ``family.model_class`` with the same
    weights; every parameter and buffer must match by name and shape."""
    config = copy.deepcopy(model.config)
    config._experts_implementation = None  # the stock class's choice; the family's class makes its own
    with torch.device("meta"):
        rebuilt = family.model_class(config)
    try:
        rebuilt.load_state_dict(model.state_dict(), strict=True, assign=True)
    except RuntimeError as error:
        raise CompressorError(
            f"{type(model).__name__} does not match {family.model_class.__name__}: {str(error).splitlines()[0]}"
        ) from None
    for name, buffer in model.named_buffers():  # non-persistent ones (rotary frequencies) are not in state_dict
        module, _, leaf = name.rpartition(".")
        rebuilt.get_submodule(module)._buffers[leaf] = buffer
    rebuilt.generation_config = model.generation_config
    return rebuilt


def load_model(name: str, device: str = "auto", dtype: str = "auto", purpose: str = "prune",
               device_map: str | None = None, max_memory: dict | None = None) -> LoadedModel:
    """Load ``name`` (folder or Hub id) to ``purpose`` it (``prune``, ``evaluate``); a family it cannot handle, a
    damaged weights file, a missing tokenizer or one larger than the vocabulary, or an unreachable Hub fails in one
    sentence before the weights load. With ``device_map`` (``compressor.placement.DEVICE_MAPS``), its decoder
    layers are spread over the GPUs within ``max_memory``."""
    from . import register

    register()
    local_path = locate_model(name)
    try:
        require_fla(PretrainedConfig.get_config_dict(name)[0].get("model_type"))
        config = AutoConfig.from_pretrained(name)
    except OSError as error:
        where = "its config.json cannot be read" if local_path is not None else "offline, or not on the Hub"
        raise CompressorError(f"could not load the config of '{name}' ({where}): {error}") from error
    except ValueError as error:
        raise CompressorError(f"the config of '{name}' cannot be read: {str(error).splitlines()[0]}") from None
    text_config = config.get_text_config()
    try:
        family = family_for(text_config, purpose)
    except CompressorError:
        family_for(config, purpose)  # raises, naming the checkpoint's own model type rather than its text model's
        raise
    check_fla_config(config)
    torch_device = resolve_device(device)
    save_dtype = checkpoint_dtype(text_config if getattr(config, "dtype", None) is None else config)
    if text_config is not config:
        warnings.warn(
            f"'{name}' is a {type(config).__name__} checkpoint: its text model ({text_config.model_type}) is pruned "
            "and written alone, without the vision tower.",
            stacklevel=2,
        )
    tokenizer = AutoTokenizer.from_pretrained(name)
    if not tokenizer("a b c")["input_ids"]:  # transformers builds an empty tokenizer where none was saved
        raise CompressorError(f"'{name}' has no usable tokenizer (no tokenizer.json or vocabulary files): every "
                              "text becomes 0 tokens; save the model's tokenizer with it.")
    vocabulary = getattr(text_config, "vocab_size", None)
    if vocabulary is not None and len(tokenizer) > vocabulary:
        raise CompressorError(f"the tokenizer of '{name}' has {len(tokenizer):,} tokens but the model's vocabulary "
                              f"only {vocabulary:,}: ids past it have no embedding; save the model's own tokenizer "
                              "with it.")
    if local_path is not None:
        check_weights(local_path)
    compute = resolve_dtype(dtype, save_dtype, torch_device)
    placed = None
    if device_map is not None:
        from accelerate import init_empty_weights

        from .placement import device_map as infer_device_map

        if text_config is not config:
            raise CompressorError("--device-map is not supported for vision-language checkpoints yet; use --device.")
        with init_empty_weights():
            skeleton = family.model_class(text_config)
        placed = infer_device_map(skeleton, device_map, max_memory, compute)
    # no hub kernels (transformers >= 5.25 fetches them by default on a GPU): calibration reads the stock mixers
    model = AutoModelForCausalLM.from_pretrained(name, dtype=compute, device_map=placed, use_kernels=False)
    if not isinstance(model, family.model_class):  # transformers' own text class of a vision-language checkpoint
        model = as_family_class(model, family)
    model = (model if placed is not None else model.to(torch_device)).eval()
    text_model_of = None if text_config is config else (config.architectures or [type(config).__name__])[0]
    return LoadedModel(model, tokenizer, family, source=name, local_path=local_path, save_dtype=save_dtype,
                       text_model_of=text_model_of)


def check_weights(folder: Path) -> None:
    """Every safetensors file of ``folder`` must open (its header read and checked against its size)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CompressorError(f"{folder} holds no *.safetensors weights.")
    for file in files:
        try:
            with safe_open(file, "pt"):
                pass
        except Exception as error:  # SafetensorError, OSError: a truncated, empty or foreign file
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CompressorError(f"the weights file {file} is damaged or not a safetensors file ({reason}).") from None


def load_structure(name: str) -> LoadedModel:
    """The model of the local folder (or ``config.json`` file) ``name`` built on the meta device from its config
    alone: shapes and parameter counts, no weights, no tokenizer. Enough to plan with saved statistics."""
    from . import register

    register()
    path = Path(name).expanduser()
    folder = path.parent if path.is_file() else path
    if not (folder / "config.json").is_file():
        raise CompressorError(f"{name} is neither a config.json file nor a folder holding one.")
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as error:
        raise CompressorError(f"the config of '{name}' cannot be read: {str(error).splitlines()[0]}") from None
    text_config = config.get_text_config()
    family = family_for(text_config)
    check_fla_config(config)
    save_dtype = checkpoint_dtype(text_config if getattr(config, "dtype", None) is None else config)
    with torch.device("meta"):
        model = family.model_class(text_config)
    model.config.dtype = save_dtype
    return LoadedModel(model.eval(), None, family, source=str(folder), local_path=folder, save_dtype=save_dtype)


def load_layer_by_layer(name: str, device: str, dtype: str, memory: int) -> LoadedModel:
    """The model of the local folder ``name`` with its parameters on the meta device and buffers real
    (accelerate's ``init_empty_weights``), its tokenizer, and a ``LayerByLayer`` that reads each decoder layer's
    weights from the safetensors files when its turn comes, within ``memory`` bytes of the device."""
    from accelerate import init_empty_weights

    from .sequential import LayerByLayer

    loaded = load_structure(name)
    torch_device = resolve_device(device)
    compute = resolve_dtype(dtype, loaded.save_dtype, torch_device)
    config = loaded.model.config
    default = torch.get_default_dtype()
    torch.set_default_dtype(compute)  # parameters created in the compute dtype, as from_pretrained creates them
    try:
        with init_empty_weights():
            model = loaded.family.model_class(config)
    finally:
        torch.set_default_dtype(default)
    model.tie_weights()
    model.config.dtype = loaded.save_dtype
    model.eval()
    loaded.model = model
    loaded.tokenizer = AutoTokenizer.from_pretrained(str(loaded.local_path))
    loaded.source = name
    loaded.layer_by_layer = LayerByLayer(model, loaded.family, loaded.local_path, torch_device, compute, memory)
    return loaded
