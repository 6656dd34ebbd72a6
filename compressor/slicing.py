"""Apply a pruning plan exactly: slice every per-head tensor (and the query/key channels), rebuild the mixers,
rewrite the config."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PreTrainedModel

from .errors import CompressorError
from .families import Family, HeadLayout, kept_indices
from .layers import PruningPlan, explicit_value_to_key, head_layout, linear_layers, pruned_layout


def stock_base(shipped: type) -> type:
    """The stock (transformers or fla) model class that a shipped model class extends: its first pretrained-model
    base."""
    return next(cls for cls in shipped.__mro__[1:] if issubclass(cls, PreTrainedModel))


def stock_class(family: Family) -> type:
    """The stock model class that the family's shipped class extends."""
    return stock_base(family.model_class)


def pruned_config(config, family: Family, layouts: dict[int, HeadLayout],
                  query_scales: dict[int, float] | None = None):
    """A copy of ``config`` with the new head counts, and ``auto_map`` pointing at the shipped modeling code.

    Same counts in every layer and stock grouping: only the global fields change, so stock loaders (and other
    engines) read the folder as an ordinary checkpoint. Otherwise ``per_layer_config`` carries each layer's
    counts and head map, which stock code refuses to read globally (AmbiguousGlobalPerLayerAttributeError).
    ``query_scales`` (layer -> scale) marks layers whose query/key channels were removed: they carry their key head
    size and query scale in ``per_layer_config`` always, since stock code would scale the queries by the new
    d_k^-0.5 instead. The shipped code is referenced either way: on CPU it keeps tensors away from fla's Triton
    kernels.
    """
    query_scales = query_scales or {}
    fields = family.fields
    new = copy.deepcopy(config)
    new.per_layer_config = None
    module = family.modeling_file.removesuffix(".py")
    new.auto_map = {"AutoModelForCausalLM": f"{module}.{family.model_class.__name__}"}
    if family.config_class is not None:
        new.auto_map["AutoConfig"] = f"{module}.{family.config_class.__name__}"
    overrides = {
        index: {
            fields.num_value_heads: layout.num_value_heads,
            fields.num_key_heads: layout.num_key_heads,
            fields.value_to_key: explicit_value_to_key(layout),
            **(family.layer_fields(config, layout) if family.layer_fields else {}),
            **({fields.key_dim: layout.key_dim, fields.query_scale: query_scales[index]}
               if index in query_scales else {}),
        }
        for index, layout in layouts.items()
    }
    uniform = {tuple(sorted((k, str(v)) for k, v in o.items())) for o in overrides.values()}
    if len(uniform) == 1 and all(o[fields.value_to_key] is None for o in overrides.values()) and not query_scales:
        for name, value in next(iter(overrides.values())).items():
            setattr(new, name, value)
        new.__dict__.pop(fields.value_to_key, None)
        new.architectures = [stock_class(family).__name__]
        return new
    setattr(new, fields.value_to_key, None)
    if query_scales:
        setattr(new, fields.query_scale, None)  # per-layer attributes need a global value: None, d_k^-0.5
    if family.per_layer_config_class is not None:
        new.__class__ = family.per_layer_config_class
        new.auto_map["AutoConfig"] = f"{module}.{family.per_layer_config_class.__name__}"
    new.per_layer_config = {str(index): override for index, override in overrides.items()}
    new.architectures = [family.model_class.__name__]
    return new


def slice_mixer(mixer: nn.Module, family: Family, kept_values: list[int],
                channels: dict[int, list[int]] | None = None) -> dict[str, torch.Tensor]:
    """The mixer's state dict restricted to ``kept_values`` (and the key heads they read, and of those the query/key
    ``channels``: key head -> kept channels; None: all)."""
    source = head_layout(mixer)
    sliced = {}
    for name, tensor in mixer.state_dict().items():
        if name in family.shared:
            sliced[name] = tensor
            continue
        if name not in family.tensors:
            raise CompressorError(f"the {family.name} table does not say how to slice '{name}'.")
        layout = family.tensors[name]
        indices, size = kept_indices(layout, source, kept_values, channels)
        if size != tensor.shape[layout.axis]:
            raise CompressorError(
                f"the {family.name} table describes {size} entries of '{name}' but it has {tensor.shape[layout.axis]}."
            )
        index = torch.tensor(indices, dtype=torch.long, device=tensor.device)
        sliced[name] = tensor.index_select(layout.axis, index).contiguous()
    return sliced


def planned_layouts(mixers: dict[int, nn.Module], plan: PruningPlan) -> dict[int, HeadLayout]:
    """Layer -> its head layout after ``plan``."""
    return {index: pruned_layout(head_layout(mixer), plan.kept[index], plan.key_dim(index, mixer.head_k_dim))
            for index, mixer in mixers.items()}


def query_scales(mixers: dict[int, nn.Module], plan: PruningPlan) -> dict[int, float]:
    """Layer -> the query scale its source computes with (d_k^-0.5 unless set), for layers whose channels ``plan``
    removes."""
    return {index: getattr(mixer, "query_scale", None) or mixer.head_k_dim**-0.5
            for index, mixer in mixers.items() if plan.key_dim(index, mixer.head_k_dim) != mixer.head_k_dim}


def slimmed_config(model: nn.Module, family: Family, plan: PruningPlan):
    """The config of ``model`` once ``plan`` is applied (``pruned_config`` of the plan's layouts)."""
    mixers = linear_layers(model, family)
    return pruned_config(model.config, family, planned_layouts(mixers, plan), query_scales(mixers, plan))


def replace_mixer(model: nn.Module, family: Family, index: int, plan: PruningPlan, new_config) -> None:
    """Replace layer ``index``'s mixer by one holding only the value heads and query/key channels ``plan`` keeps
    (its tensors sliced where they are: on a device, or on the meta device for shapes alone)."""
    layer = model.model.layers[index]
    mixer = getattr(layer, family.mixer_attr)
    state = slice_mixer(mixer, family, plan.kept[index], plan.channels.get(index))
    layer_config = new_config.per_layer_config[index]
    with torch.device("meta"):
        new_mixer = family.mixer_class(layer_config, index)
    new_mixer.load_state_dict(state, strict=True, assign=True)
    family.mixer_class.adopt(new_mixer, getattr(layer_config, family.fields.value_to_key, None))
    new_mixer.query_scale = getattr(layer_config, family.fields.query_scale, None)
    new_mixer.train(mixer.training)
    setattr(layer, family.mixer_attr, new_mixer)


def slim(model: nn.Module, family: Family, plan: PruningPlan) -> None:
    """Physically remove the heads and query/key channels that ``plan`` drops, in place; ``model.config`` is
    replaced."""
    old_config, new_config = model.config, slimmed_config(model, family, plan)
    for index in linear_layers(model, family):
        replace_mixer(model, family, index, plan, new_config)
    for module in model.modules():
        if getattr(module, "config", None) is old_config:
            module.config = new_config
    refresh = getattr(model, "refresh_layouts", None)  # what a shipped class reads from the whole config
    if refresh is not None:
        refresh()


def planned_sizes(model: nn.Module, family: Family, plan: PruningPlan, dtype: torch.dtype) -> dict:
    """Recurrent-state bytes (one sequence, in ``dtype``), parameter count and config kind after ``plan``,
    computed without slicing anything."""
    mixers = linear_layers(model, family)
    element = torch.empty((), dtype=dtype).element_size()
    removed_parameters, state = 0, 0
    layouts = planned_layouts(mixers, plan)
    for index, mixer in mixers.items():
        source = head_layout(mixer)
        state += len(plan.kept[index]) * layouts[index].key_dim * source.value_dim * element
        for name, tensor in mixer.state_dict().items():
            if name in family.tensors:
                layout = family.tensors[name]
                kept, size = kept_indices(layout, source, plan.kept[index], plan.channels.get(index))
                removed_parameters += tensor.numel() // size * (size - len(kept))
    config = pruned_config(model.config, family, layouts, query_scales(mixers, plan))
    return {
        "per_layer_heads": config.is_heterogeneous,
        "state_bytes_after": state,
        "params_after": sum(p.numel() for p in model.parameters()) - removed_parameters,
    }
