"""compressor: prune linear-attention heads by the behaviour of their recurrent states.

Importing the package changes nothing in transformers. :func:`register` (called by every command that loads a
model) registers the shipped model classes with transformers' Auto classes, so that
``AutoModelForCausalLM.from_pretrained(folder)`` then loads a pruned folder without ``trust_remote_code``; the
classes also load stock checkpoints of these families, routing CPU tensors away from fla's kernels.
"""

from .errors import CompressorError

__version__ = "0.1.0"


def register() -> None:
    """Register the shipped model classes for every supported model type with transformers' Auto classes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .families import FAMILIES

    for family in FAMILIES:
        for model_type in family.model_types:
            config_class = AutoConfig.for_model(model_type).__class__
            if config_class is not family.per_layer_config_class:  # those the modeling file registers itself
                AutoModelForCausalLM.register(config_class, family.model_class, exist_ok=True)


__all__ = ["CompressorError", "__version__", "register"]
