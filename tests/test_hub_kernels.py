"""Hub kernels stay off unless asked for: a shipped folder's ``from_pretrained`` and compressor's own loading pass
``use_kernels=False``, where transformers >= 5.25 would default to fetching kernels from the Hub (and fail offline).
transformers' ``set_use_kernels`` is replaced by a recorder, so nothing is fetched or swapped here."""

from __future__ import annotations

import pytest
from tiny_fla import plans_for, tiny_fla_model
from tiny_hybrids import FIXTURE
from tiny_models import PLANS, tiny_model
from transformers import AutoModelForCausalLM, PreTrainedModel

from compressor.export import write_model
from compressor.families import FAMILIES, family_for
from compressor.layers import PruningPlan
from compressor.loading import load_model
from compressor.modeling.stock_dispatch import HubKernelsOffByDefault
from compressor.slicing import slim


@pytest.fixture
def use_kernels_asked(monkeypatch) -> list:
    """The ``use_kernels`` value of every ``set_use_kernels`` call from here on (transformers >= 5.25 defaults to
    True, older ones to False: on those only an explicit False or True is told apart)."""
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)  # it overrides what the caller asks
    asked = []
    monkeypatch.setattr(PreTrainedModel, "set_use_kernels",
                        lambda self, use_kernels, *args, **kwargs: asked.append(use_kernels))
    return asked


def pruned_folder(name: str, folder):
    model = tiny_fla_model(name) if name == "kda_gva" else tiny_model(name)
    plan = plans_for(name)["uneven"] if name == "kda_gva" else PLANS["uneven"]
    family = family_for(model.config)
    slim(model, family, PruningPlan(kept=plan))
    write_model(model, family, folder)
    return folder


@pytest.mark.parametrize("name", ["qwen3_5", "qwen3_next_dense", "kda_gva"])
def test_a_pruned_folder_loads_without_hub_kernels_unless_asked(name, tmp_path, use_kernels_asked):
    folder = pruned_folder(name, tmp_path / name)
    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, use_kernels=True)
    assert use_kernels_asked == [False, True]


def test_every_shipped_class_defaults_to_no_hub_kernels():
    """Before transformers' own ``from_pretrained`` in the method order of every family's model class."""
    for family in FAMILIES:
        order = family.model_class.__mro__
        assert HubKernelsOffByDefault in order, family.model_class
        assert order.index(HubKernelsOffByDefault) < order.index(PreTrainedModel), family.model_class


def test_compressor_loads_its_source_without_hub_kernels(monkeypatch):
    """Asked explicitly, not through the shipped classes' default: transformers' own class of a vision-language
    checkpoint loads the same way."""
    asked = []
    load = AutoModelForCausalLM.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        asked.append(kwargs.get("use_kernels"))
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(recording))
    load_model(str(FIXTURE), device="cpu")
    assert asked == [False]


def test_a_callers_kernel_choice_is_passed_on():
    """``use_kernels`` defaults to False, a caller's value or ``kernel_config`` reaches transformers untouched."""

    class Stock:
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            return kwargs

    class Shipped(HubKernelsOffByDefault, Stock):
        pass

    config = object()
    assert Shipped.from_pretrained("folder") == {"use_kernels": False}
    assert Shipped.from_pretrained("folder", use_kernels=True) == {"use_kernels": True}
    assert Shipped.from_pretrained("folder", kernel_config=config) == {"kernel_config": config}
