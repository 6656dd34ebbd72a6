"""Kernel choices that transformers makes for a stock class, made the same way for a subclass shipped in a folder.

Shipped inside output folders whose model has MoE experts (imports nothing).
"""

from __future__ import annotations


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
