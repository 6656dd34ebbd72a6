"""The chunked next-token loss (hidden states through the output head a few positions at a time) equals the
cross-entropy of the model's own logits, for every family."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_fla import tiny_fla_model
from tiny_hybrids import tiny_hybrid
from tiny_models import CONFIGS, tiny_model

from compressor.evaluation import token_losses

MODELS = {
    **{name: (lambda name=name: tiny_model(name)) for name in CONFIGS},
    **{name: (lambda name=name: tiny_hybrid(name)) for name in ("qwen3_5_moe", "olmo_hybrid", "kimi_linear")},
    **{name: (lambda name=name: tiny_fla_model(name)) for name in ("gated_deltanet_gva", "delta_net", "gla", "kda_gva")},
}


@pytest.mark.parametrize("name", MODELS)
def test_chunked_token_losses_equal_the_cross_entropy_of_the_logits(name):
    model = MODELS[name]()
    ids = torch.randint(3, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        expected = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(2, -1)
        chunked = token_losses(model, ids, positions_per_chunk=7)  # 78 positions: 11 full chunks and a partial one
    assert chunked.shape == (2, 39)
    assert (chunked - expected).abs().max().item() <= 1e-5
