"""compressor: prune linear-attention heads by the behaviour of their recurrent states.

Importing the package registers the pruned model classes with transformers' Auto classes, so that
``AutoModelForCausalLM.from_pretrained(folder)`` loads a pruned folder without ``trust_remote_code``
(the classes also load stock checkpoints of these families, routing CPU tensors away from fla's kernels).
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .errors import CompressorError
from .families import FAMILIES

__version__ = "0.1.0"

for _family in FAMILIES:
    for _model_type in _family.model_types:
        _config_class = AutoConfig.for_model(_model_type).__class__
        if _config_class is not _family.per_layer_config_class:  # those the modeling file registers itself
            AutoModelForCausalLM.register(_config_class, _family.model_class, exist_ok=True)

__all__ = ["CompressorError", "__version__"]
