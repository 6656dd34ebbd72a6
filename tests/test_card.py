"""The model card rendered from a compression.json record."""

from __future__ import annotations

import copy
import importlib.resources
import json
import re

import pytest
from huggingface_hub import ModelCard

from compressor.card import human_bytes, human_params, render_card

RECORD = {
    "format": 1,
    "base_model": "Qwen/Qwen3.5-0.8B",
    "family": "qwen3_5_text",
    "license": "apache-2.0",
    "method": {"name": "joint", "alpha": 0.5, "remove": "high", "state_reduction": 0.389, "min_heads_per_layer": 1,
               "seed": 0},  # fmt: skip
    "calibration": {"source": "hf://datasets/Salesforce/wikitext/wikitext-2-raw-v1", "samples": 16, "seq_len": 2048,
                    "tokens": 32768},  # fmt: skip
    "layers": {  # 8 value heads over 4 key heads per layer; layers 3 and 4 keep uneven groups
        "0": {"heads_before": 8, "kept_heads": [0, 1, 2, 3, 4, 5], "key_heads_before": 4, "kept_key_heads": [0, 1, 2],
              "value_to_key": None, "score": [0.1] * 8, "rank": [3.0] * 8, "norm": [1.0] * 8},
        "1": {"heads_before": 8, "kept_heads": [0, 1, 4, 5], "key_heads_before": 4, "kept_key_heads": [0, 2],
              "value_to_key": None, "score": [0.1] * 8, "rank": [3.0] * 8, "norm": [1.0] * 8},
        "3": {"heads_before": 8, "kept_heads": [0, 2, 3, 5, 6], "key_heads_before": 4, "kept_key_heads": [0, 1, 2, 3],
              "value_to_key": [0, 1, 1, 2, 3], "score": [0.1] * 8, "rank": [3.0] * 8, "norm": [1.0] * 8},
        "4": {"heads_before": 8, "kept_heads": [1, 2, 3, 4, 6], "key_heads_before": 4, "kept_key_heads": [0, 1, 2, 3],
              "value_to_key": [0, 1, 1, 2, 3], "score": [0.1] * 8, "rank": [3.0] * 8, "norm": [1.0] * 8},
    },  # fmt: skip
    "per_layer_heads": True,
    "state_bytes_before": 65536,
    "state_bytes_after": 40960,
    "params_before": 6_060_000,
    "params_after": 5_891_000,
    "eval": {"perplexity_before": 19.7, "perplexity_after": 24.318, "recall_accuracy_before": 0.91,
             "recall_accuracy_after": 0.845, "data": "eval.txt", "tokens": 65536},  # fmt: skip
    "verify": {"max_abs_logit_diff": 1.2e-06, "passed": True},
    "versions": {"compressor": "0.1.0", "torch": "2.13.0", "transformers": "5.23.0", "fla": None},
}


def _front_matter(card: str) -> dict:
    """A tiny parser for the card's flat front matter: ``key: scalar`` and ``key:`` followed by ``- item``."""
    lines = card.splitlines()
    assert lines[0] == "---"
    end = lines.index("---", 1)
    data, key = {}, None
    for line in lines[1:end]:
        if line.startswith("- "):
            data[key].append(_scalar(line[2:]))
        else:
            key, _, value = line.partition(": ") if ": " in line else (line.rstrip(":"), "", "")
            data[key] = _scalar(value) if value else []
    return data


def _scalar(text: str):
    return json.loads(text) if text.startswith('"') else text


def _lines(card: str) -> set[str]:
    return set(card.splitlines())


def test_template_ships_with_the_package():
    template = importlib.resources.files("compressor.model_cards").joinpath("model_card.md.j2")
    assert template.is_file()


def test_front_matter():
    card = render_card(RECORD)
    expected = {
        "base_model": "Qwen/Qwen3.5-0.8B",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "license": "apache-2.0",
        "tags": ["pruned", "linear-attention", "qwen3_5_text", "compressor"],
        "datasets": ["Salesforce/wikitext"],
    }
    assert _front_matter(card) == expected
    assert ModelCard(card).data.to_dict() == expected  # what huggingface_hub validates before an upload
    assert "base_model_relation" not in card


def test_body_tables_and_numbers():
    card = render_card(RECORD)
    lines = _lines(card)
    assert "12 of its 32 linear-attention value heads removed" in card
    assert "`joint` method (removing the heads with the highest scores)" in card
    assert {
        "| 0 | 8 → 6 | 0, 1, 2, 3, 4, 5 | 4 → 3 |",
        "| 1 | 8 → 4 | 0, 1, 4, 5 | 4 → 2 |",
        "| 3 | 8 → 5 | 0, 2, 3, 5, 6 | 4 → 4 |",
        "| 4 | 8 → 5 | 1, 2, 3, 4, 6 | 4 → 4 |",
    } <= lines
    assert "| `alpha` | 0.5 |" in lines and "| `state_reduction` | 0.389 |" in lines
    assert "| sequence length | 2,048 tokens |" in lines
    assert (
        "| recurrent state per sequence | 64.00 KiB (65,536 bytes) | 40.00 KiB (40,960 bytes) | 37.5 % |" in lines
    )
    assert "| parameters | 6.06M | 5.89M | 2.8 % |" in lines
    assert "| perplexity | 19.70 | 24.32 |" in lines
    assert "| recall accuracy | 91.0 % | 84.5 % |" in lines
    assert "Measured on `eval.txt` (65,536 tokens), before and after pruning." in lines
    assert "maximum absolute difference 1.2e-06, **passed**." in lines
    assert {"| 3 | 0, 1, 1, 2, 3 |", "| 4 | 0, 1, 1, 2, 3 |"} <= lines  # value→key maps
    assert "| fla | not installed |" in lines
    assert 'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", trust_remote_code=True)' in lines
    assert "vLLM, llama.cpp, SGLang" in card and "arXiv 2602.02195" in card
    assert "vision tower" not in card  # only for the text model of a vision-language checkpoint


def test_figures_command_and_repo_id():
    command = "compress prune Qwen/Qwen3.5-0.8B --out out --state-reduction 0.389"
    card = render_card(RECORD, command=command, figures=["figures/ranks.png"], repo_id="alice/pruned")
    assert "![ranks](figures/ranks.png)" in _lines(card)
    assert f"```bash\n{command}\n```" in card
    assert 'model = AutoModelForCausalLM.from_pretrained("alice/pruned", trust_remote_code=True)' in _lines(card)


def test_uniform_local_minimal_record(tmp_path):
    record = copy.deepcopy(RECORD)
    record.update(base_model=str(tmp_path / "my-model"), license=None, per_layer_heads=False)
    record["calibration"]["source"] = "builtin:python-docs"
    for layer in record["layers"].values():
        layer.update(kept_heads=[0, 1, 2, 3, 4, 5], kept_key_heads=[0, 1, 2], value_to_key=None)
    del record["eval"], record["verify"]
    card = render_card(record)
    front = _front_matter(card)
    assert "base_model" not in front and "license" not in front and "datasets" not in front
    assert f"`{tmp_path / 'my-model'}`" in card
    assert "trust_remote_code" not in card
    assert "## Value→key head map" not in card and "## Evaluation" not in card and "## Verification" not in card
    assert "vLLM" not in card
    assert "(nothing: no evaluation was run)" in card


@pytest.mark.parametrize("base_model", ["./models/qwen", "/abs/qwen", "a/b/c", "owner/bad..name"])
def test_base_model_only_for_hub_ids(base_model):
    assert "base_model" not in _front_matter(render_card({**RECORD, "base_model": base_model}))


def test_no_token_in_card(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret-from-env-123")
    record = copy.deepcopy(RECORD)
    record["calibration"]["source"] = "notes-secret-from-env-123.txt"
    command = "compress prune Qwen/Qwen3.5-0.8B --out out --push-to-hub alice/x --token hf_AbCdEfGhIjKlMnOpQr"
    card = render_card(record, command=command)
    assert "secret-from-env-123" not in card
    assert "hf_AbCdEfGhIjKlMnOpQr" not in card and not re.search(r"hf_[A-Za-z0-9]{8,}", card)
    assert "--push-to-hub alice/x --token ***" in card


@pytest.mark.parametrize(
    ("n", "text"),
    [(512, "512 B"), (1536, "1.50 KiB"), (40960, "40.00 KiB"), (3 * 1024**2, "3.00 MiB"), (5 * 1024**3, "5.00 GiB")],
)
def test_human_bytes(n, text):
    assert human_bytes(n) == text


@pytest.mark.parametrize(("n", "text"), [(950, "950"), (6_060_000, "6.06M"), (1_350_000_000, "1.35B")])
def test_human_params(n, text):
    assert human_params(n) == text
