"""Kernel choices for the model classes shipped in a folder: the stock class's, and no hub kernels by default.

Shipped inside every output folder that ships code (imports nothing).
"""

from __future__ import annotations


class HubKernelsOffByDefault:
    """Mixin for a shipped ``...ForCausalLM``: ``from_pretrained`` loads no kernels from the Hub unless the caller
    passes ``use_kernels=True`` or a ``kernel_config``.

    transformers 5.25 turned hub kernels on by default: on a GPU, ``from_pretrained`` then fetches kernels (for the
    linear-attention families ``kernels-community/fla``, for activations ``kernels-community/activation``) to swap
    into the stock modules, and fails without a network. The shipped mixers call fla themselves, and this code was
    checked without hub kernels, as transformers 5.21-5.24 load by default. After ``compressor.register()`` these
    classes also load the stock checkpoints of their families in that process.
    """

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        if kwargs.get("kernel_config") is None:
            kwargs.setdefault("use_kernels", False)
        return super().from_pretrained(*args, **kwargs)


class StockExpertsDispatch:
    """Mixin for a shipped subclass of a stock transformers ``...ForCausalLM`` whose MoE experts are the stock ones.

    transformers lets a class choose its experts' kernel (``grouped_mm``, its default, instead of a Python loop over
    the experts) only if the source of the class's own module uses ``@use_experts_implementation``. A subclass
    defined elsewhere fails that test and would run the loop; it asks the stock class instead.
    """

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        stock = next((base for base in cls.__mro__ if base.__module__.startswith("transformers.models.")), None)
        if stock is None:
            raise TypeError(f"{cls.__name__}: StockExpertsDispatch needs a transformers model class among its bases")
        return stock._can_set_experts_implementation()
