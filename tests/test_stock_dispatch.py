"""The shipped MoE classes let transformers choose their experts' kernel exactly when it lets their stock class."""

from __future__ import annotations

import pytest
from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearForCausalLM
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeForCausalLM
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextForCausalLM

from compressor.modeling.modeling_kimi_linear import PrunedKimiLinearForCausalLM
from compressor.modeling.modeling_qwen3_5_moe import PrunedQwen3_5MoeForCausalLM
from compressor.modeling.modeling_qwen3_next import PrunedQwen3NextForCausalLM
from compressor.modeling.stock_dispatch import StockExpertsDispatch

CACHED = "_can_set_experts_implementation_cached_value"


@pytest.mark.parametrize("shipped, stock", [(PrunedQwen3NextForCausalLM, Qwen3NextForCausalLM),
                                            (PrunedQwen3_5MoeForCausalLM, Qwen3_5MoeForCausalLM),
                                            (PrunedKimiLinearForCausalLM, KimiLinearForCausalLM)])
def test_shipped_moe_classes_may_choose_their_experts_kernel_as_their_stock_class(monkeypatch, shipped, stock):
    for klass in shipped.__mro__:  # transformers' cached verdicts, which a subclass would inherit
        if CACHED in vars(klass):
            monkeypatch.delattr(klass, CACHED)
    assert shipped._can_set_experts_implementation() is True  # first: no verdict of the stock class to inherit
    assert stock._can_set_experts_implementation() is True


def test_a_class_without_a_transformers_base_is_refused_with_its_name():
    class Stray(StockExpertsDispatch):
        pass

    with pytest.raises(TypeError, match="Stray: StockExpertsDispatch needs a transformers model class"):
        Stray._can_set_experts_implementation()
