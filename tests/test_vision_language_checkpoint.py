"""A vision-language checkpoint (Qwen3.5 as published: ``qwen3_5`` with a text and a vision config) is pruned
through its text model, which is written alone with the text model's weights, not a fresh initialisation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from tiny_hybrids import EVAL_TEXT, FIXTURE, TOKENIZER_FILES, VOCAB, tiny_hybrid
from tiny_models import masked_copy, tiny_model
from transformers import (
    AutoModelForCausalLM,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeConfig,
    Qwen3_5MoeForConditionalGeneration,
)

from compressor.cli import main
from compressor.loading import load_model

VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2)


CHECKPOINTS = {  # model type: (config class, model class, a tiny text model)
    "qwen3_5": (Qwen3_5Config, Qwen3_5ForConditionalGeneration, lambda: tiny_model("qwen3_5")),
    "qwen3_5_moe": (Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration, lambda: tiny_hybrid("qwen3_5_moe")),
}


def saved_vision_language_model(model_type, folder):
    config_class, model_class, tiny_text_model = CHECKPOINTS[model_type]
    text = {**tiny_text_model().config.to_dict(), "vocab_size": VOCAB}
    torch.manual_seed(0)
    model = model_class(config_class(text_config=text, vision_config={**VISION, "out_hidden_size": text["hidden_size"]}))
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copyfile(FIXTURE / name, folder / name)
    return model


@pytest.mark.parametrize("model_type", CHECKPOINTS)
def test_the_text_model_is_loaded_with_the_checkpoint_weights(model_type, tmp_path):
    source = saved_vision_language_model(model_type, tmp_path / "vlm")
    loaded = load_model(str(tmp_path / "vlm"), device="cpu", dtype="float32")
    assert isinstance(loaded.model, loaded.family.model_class)
    assert loaded.model.config.model_type == f"{model_type}_text"
    published = dict(source.named_parameters())
    for name, parameter in loaded.model.named_parameters():
        original = published[name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name]
        assert torch.equal(parameter, original), name


@pytest.mark.parametrize("model_type", CHECKPOINTS)
def test_prune_writes_the_pruned_text_model_alone(model_type, tmp_path):
    saved_vision_language_model(model_type, tmp_path / "vlm")
    out = tmp_path / "pruned"
    args = ["prune", tmp_path / "vlm", "--out", out, "--state-reduction", 0.3, "--method", "norm", "--remove", "low", "--samples", 2,
            "--seq-len", 128, "--device", "cpu", "--eval", EVAL_TEXT, "--eval-samples", 2, "--eval-seq-len", 128]
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    record = json.loads((out / "compression.json").read_text())
    assert config["model_type"] == f"{model_type}_text" and "vision_config" not in config
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert not any("visual" in name for name in weights.keys())
    assert record["verify"]["passed"] and 1 - record["state_bytes_after"] / record["state_bytes_before"] >= 0.3
    card = (out / "README.md").read_text()
    assert f"vision-language model (`{CHECKPOINTS[model_type][1].__name__}`)" in card
    assert "- Text only: the base model's vision tower is not part of this folder." in card

    kept = {int(layer): entry["kept_heads"] for layer, entry in record["layers"].items()}
    masked = masked_copy(load_model(str(tmp_path / "vlm"), device="cpu", dtype="float32").model, kept)
    pruned = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.randint(3, VOCAB, (2, 150), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (pruned(ids).logits - masked(ids).logits).abs().max().item() <= 1e-4
