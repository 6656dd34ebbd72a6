"""The model card, rendered from the record of a real ``prune`` of the fixture."""

from __future__ import annotations

import dataclasses
import importlib.resources
import importlib.util
import re

import pytest
from conftest import EVAL_TEXT, FIXTURE
from huggingface_hub import ModelCard

from compressor.card import human_bytes, human_params, render_card, replays_decode_graphs
from compressor.pipeline import prune
from compressor.settings import CalibrationSettings, EvalSettings, PruneSettings

UNEVEN = "0:6,1:4,3:5,4:5"  # 8 value heads over 4 key heads per layer: odd counts leave uneven groups


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A real prune (norm, remove high, explicit head counts, eval and verification) and its output folder."""
    out = tmp_path_factory.mktemp("card") / "pruned"
    settings = PruneSettings(method="norm", remove="high", heads_per_layer=UNEVEN, base_model="Qwen/Qwen3.5-0.8B",
                             calibration=CalibrationSettings(samples=1, seq_len=128),
                             evaluation=EvalSettings(EVAL_TEXT, 2, 128))
    return prune(str(FIXTURE), out, settings, command="compress prune x --token hf_AbCdEfGhIjKlMnOpQr", progress=False)


@pytest.fixture
def record(pruned):
    return dataclasses.replace(pruned.record)


def front_matter(card: str) -> dict:
    return ModelCard(card).data.to_dict()


def test_template_ships_with_the_package():
    assert importlib.resources.files("compressor.model_cards").joinpath("model_card.md.j2").is_file()


def test_the_written_card_is_the_rendered_record(pruned):
    written = (pruned.out_dir / "README.md").read_text()
    assert "![removed_heads](figures/removed_heads.png)" in written
    assert (pruned.out_dir / "figures" / "removed_heads.png").is_file()
    assert "hf_AbCdEfGhIjKlMnOpQr" not in written and "--token ***" in written


def test_front_matter_names_the_base_model_and_the_dataset(record):
    record.license = "apache-2.0"
    record.calibration = dataclasses.replace(record.calibration,
                                             source="hf:Salesforce/wikitext:wikitext-2-raw-v1 (split train, column 'text')")
    assert front_matter(render_card(record)) == {
        "base_model": "Qwen/Qwen3.5-0.8B", "library_name": "transformers", "pipeline_tag": "text-generation",
        "license": "apache-2.0", "tags": ["pruned", "linear-attention", "qwen3_5_text", "compressor"],
        "datasets": ["Salesforce/wikitext"],
    }


def test_body_tables_follow_the_record(record):
    card = render_card(record)
    lines = set(card.splitlines())
    removed = sum(layer.heads_before - len(layer.kept_heads) for layer in record.layers.values())
    assert removed == 12 and "12 of its 32 linear-attention value heads removed" in card
    assert "`norm` method (removing the heads with the highest scores)" in card
    for index, layer in record.layers.items():
        keys = f"{layer.key_heads_before} → {len(layer.kept_key_heads)}"
        assert f"| {index} | 8 → {len(layer.kept_heads)} | {', '.join(map(str, layer.kept_heads))} | {keys} |" in lines
        if layer.value_to_key is not None:
            assert f"| {index} | {', '.join(map(str, layer.value_to_key))} |" in lines
    assert any(layer.value_to_key is not None for layer in record.layers.values())
    assert f"| perplexity | {record.eval.perplexity_before:.2f} | {record.eval.perplexity_after:.2f} |" in lines
    before, after = record.eval.recall_accuracy_before, record.eval.recall_accuracy_after
    assert f"| copy-recall accuracy | {100 * before:.1f} % | {100 * after:.1f} % |" in lines
    assert f"maximum absolute difference {record.verify.max_abs_logit_diff:.3g}, **passed**." in lines
    assert 'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", trust_remote_code=True)' in lines
    assert "vision tower" not in card  # only for the text model of a vision-language checkpoint


def test_the_card_says_how_to_turn_decode_graphs_off_where_the_shipped_code_records_them(record):
    assert "module.use_decode_graph = False" in render_card(record)  # Qwen3.5's shipped layers record them
    assert replays_decode_graphs("qwen3_next") and replays_decode_graphs("olmo_hybrid")
    assert replays_decode_graphs("kimi_linear") and not replays_decode_graphs("unknown")
    if importlib.util.find_spec("fla") is not None:  # fla's layers have forwards of their own
        assert not any(map(replays_decode_graphs, ("gated_deltanet", "kda", "gla", "delta_net")))


def test_a_local_source_without_eval_or_verification(record, tmp_path):
    record.base_model, record.eval, record.verify = str(tmp_path / "my-model"), None, None
    card = render_card(record)
    assert "base_model" not in front_matter(card) and "datasets" not in front_matter(card)
    assert f"`{tmp_path / 'my-model'}`" in card
    assert "## Evaluation" not in card and "## Verification" not in card
    assert "(nothing: no evaluation was run)" in card


@pytest.mark.parametrize("base_model", ["./models/qwen", "/abs/qwen", "a/b/c", "owner/bad..name"])
def test_base_model_only_for_hub_ids(record, base_model):
    record.base_model = base_model
    assert "base_model" not in front_matter(render_card(record))


def test_no_token_in_card(record, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret-from-env-123")
    record.calibration = dataclasses.replace(record.calibration, source="notes-secret-from-env-123.txt")
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
