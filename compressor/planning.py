"""Plans without weights: what a plan keeps, frees and writes, from a config and saved statistics alone (the model
built on the meta device), for models too large to load where the plan is made."""

from __future__ import annotations

from .layers import PruningPlan
from .loading import LoadedModel
from .slicing import slim


def output_shards(loaded: LoadedModel, plan: PruningPlan, max_shard_size: str) -> list[int]:
    """Bytes of each safetensors shard the pruned model would be written in: its parameters (each once) and
    persistent buffers in the checkpoint's dtype, in order, a new shard whenever the next tensor would pass
    ``max_shard_size`` (an estimate: ``save_pretrained`` may group them otherwise). Slims ``loaded.model`` (on the
    meta device: shapes)."""
    from huggingface_hub.serialization._base import parse_size_to_int

    slim(loaded.model, loaded.family, plan)
    limit = parse_size_to_int(max_shard_size)
    persistent = set(loaded.model.state_dict())
    tensors = [p for _, p in loaded.model.named_parameters()]
    tensors += [b for name, b in loaded.model.named_buffers() if name in persistent]
    shards, current = [], 0
    for tensor in tensors:
        size = tensor.numel() * (loaded.save_dtype.itemsize if tensor.is_floating_point() else tensor.element_size())
        if current and current + size > limit:
            shards.append(current)
            current = 0
        current += size
    return [*shards, current]
