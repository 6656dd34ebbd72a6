"""The ``compress`` command line, in-process through click's CliRunner (imports are paid once).

One full ``compress prune`` (joint, --remove high, --eval, verify) and one ``compress analyze`` run per module
are shared by several tests; everything else is a dry run, reuses the analyzed statistics, or fails early.
Settings are tiny (4 × 512 tokens) so the file stays well under two minutes on a 2-core CPU.
"""

from __future__ import annotations

import json
import shutil
import math
import re
from pathlib import Path

import click
import pytest

import compressor
import compressor.loading
import compressor.pipeline
from conftest import EVAL_TEXT, assert_user_error, invoke
from compressor.calibration import StateStatistics
from compressor.cli import main
from compressor.outputs import MARKER

SMALL = ["--samples", "4", "--seq-len", "512", "--batch-size", "4"]
SMALL_EVAL = ["--eval-samples", "4", "--eval-seq-len", "512"]
STATE_REDUCTION = 0.389
LINEAR_LAYERS = ["0", "1", "3", "4"]
HEADS, KEY_DIM, VALUE_DIM, BF16_BYTES = 8, 32, 32, 2
HEAD_BYTES = KEY_DIM * VALUE_DIM * BF16_BYTES
PLAN_LINE = re.compile(r"^\s*(\d+)\s+(\d+) -> (\d+)\s+(\[[\d, ]*\])\s*$")


def printed_plan(output: str) -> dict[str, list[int]]:
    """Layer -> kept value heads, parsed from the summary table that prune prints."""
    plan = {}
    for line in output.splitlines():
        match = PLAN_LINE.match(line)
        if match:
            plan[match[1]] = json.loads(match[4])
            assert len(plan[match[1]]) == int(match[3])
    return plan


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture
def no_weights_load(monkeypatch):
    """Let load_model read the config but fail the test if it gets as far as loading weights."""

    class Refuse:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise AssertionError("the weights were loaded before the bad input was refused")

    monkeypatch.setattr(compressor.loading, "AutoModelForCausalLM", Refuse)


@pytest.fixture(scope="module")
def pruned(fixture_model_path, tmp_path_factory):
    """One full prune (joint, remove high, R = 0.389, --eval, verify): (result, out folder)."""
    out = tmp_path_factory.mktemp("e2e") / "pruned"
    result = invoke(
        "prune", fixture_model_path, "--out", out, "--method", "joint", "--remove", "high",
        "--state-reduction", STATE_REDUCTION,
        *SMALL, "--eval", EVAL_TEXT, *SMALL_EVAL,
    )
    return result, out


@pytest.fixture(scope="module")
def record(pruned) -> dict:
    result, out = pruned
    assert result.exit_code == 0, result.output
    return json.loads((out / "compression.json").read_text())


@pytest.fixture(scope="module")
def stats_dir(fixture_model_path, tmp_path_factory) -> Path:
    """``compress analyze --out`` with the same settings as the shared prune."""
    out = tmp_path_factory.mktemp("analyze") / "stats"
    result = invoke("analyze", fixture_model_path, "--out", out, *SMALL)
    assert result.exit_code == 0, result.output
    assert (out / "stats.safetensors").is_file()
    assert "wrote" in result.stdout and "mean threshold rank" in result.stdout
    return out


# 1. End to end ---------------------------------------------------------------------------------------------


def test_prune_exits_cleanly_and_prints_the_summary(pruned):
    result, out = pruned
    assert result.exit_code == 0, result.output
    assert result.exception is None
    assert "recurrent state per sequence" in result.stdout
    assert f"smaller; asked: {STATE_REDUCTION:.1%})" in result.stdout
    assert "perplexity" in result.stdout
    assert f"wrote {out}" in result.stdout
    assert "dry run" not in result.stdout
    assert "verified" in result.stdout
    kept = sum(len(heads) for heads in printed_plan(result.stdout).values())
    total = len(LINEAR_LAYERS) * HEADS
    assert f"{total - kept} of {total} value heads removed" in result.stdout


def test_prune_reaches_the_state_reduction(record):
    before, after = record["state_bytes_before"], record["state_bytes_after"]
    assert before == len(LINEAR_LAYERS) * HEADS * HEAD_BYTES
    assert after <= (1 - STATE_REDUCTION) * before
    assert after == sum(len(layer["kept_heads"]) * HEAD_BYTES for layer in record["layers"].values())


def test_prune_record_follows_the_contract(record, fixture_model_path):
    assert record["format"] == 2
    assert record["source"] == str(fixture_model_path)
    assert record["base_model"] == str(fixture_model_path)
    assert record["method"]["name"] == "joint"
    assert record["method"]["alpha"] == 0.5
    assert record["method"]["remove"] == "high"
    calibration = record["calibration"]
    assert calibration["source"]
    assert (calibration["samples"], calibration["seq_len"], calibration["tokens"]) == (4, 512, 4 * 512)

    assert sorted(record["layers"], key=int) == LINEAR_LAYERS
    for layer in record["layers"].values():
        assert layer["heads_before"] == HEADS
        kept = layer["kept_heads"]
        assert kept == sorted(set(kept)) and kept and all(0 <= h < HEADS for h in kept)
        for metric in ("score", "rank", "norm"):
            assert len(layer[metric]) == HEADS and all(math.isfinite(x) for x in layer[metric])
        assert all(0 <= r <= min(KEY_DIM, VALUE_DIM) for r in layer["rank"])

    assert 0 < record["params_after"] < record["params_before"]
    evaluation = record["eval"]
    for key in ("perplexity_before", "perplexity_after"):
        assert math.isfinite(evaluation[key]) and evaluation[key] > 1
    assert evaluation["data"] == str(EVAL_TEXT)
    versions = record["versions"]
    assert set(versions) >= {"compressor", "torch", "transformers", "fla"}
    assert versions["compressor"] == compressor.__version__
    assert versions["torch"] and versions["transformers"]
    assert record["verify"]["passed"] is True


def test_prune_config_matches_the_record(pruned, record):
    _, out = pruned
    config = json.loads((out / "config.json").read_text())
    assert "AutoModelForCausalLM" in config["auto_map"]
    kept = {layer: len(info["kept_heads"]) for layer, info in record["layers"].items()}
    assert len(set(kept.values())) > 1, "the shared prune keeps different counts per layer"
    per_layer = {str(int(k)): v for k, v in config["per_layer_config"].items()}  # keys may be zero-padded
    assert set(per_layer) == set(kept)
    for layer, count in kept.items():
        assert per_layer[layer].get("linear_num_value_heads", config["linear_num_value_heads"]) == count


def test_prune_writes_a_complete_folder(pruned, record):
    _, out = pruned
    names = {p.name for p in out.iterdir()}
    assert any(name.endswith(".safetensors") for name in names)
    for name in ("config.json", "compression.json", "README.md", "tokenizer.json", "generation_config.json",
                 "modeling_qwen3_5.py", "gated_delta.py", "gated_deltanet.py"):
        assert name in names, sorted(names)
    assert not [p.name for p in out.parent.iterdir() if ".partial-" in p.name]

    card = (out / "README.md").read_text()
    assert "Heads per layer" in card
    for layer, info in record["layers"].items():
        assert f"| {layer} | {info['heads_before']} → {len(info['kept_heads'])} |" in card
    embedded = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card)
    assert "figures/removed_heads.png" in embedded and len(embedded) == 4
    for path in embedded:
        assert (out / path).read_bytes().startswith(b"\x89PNG"), path


# 2. Dry runs -----------------------------------------------------------------------------------------------


def test_dry_run_remove_low_writes_nothing(fixture_model_path, tmp_path, record):
    out = tmp_path / "low"
    result = invoke("prune", fixture_model_path, "--method", "joint", "--out", out, "--remove", "low", "--dry-run",
                    *SMALL)
    assert result.exit_code == 0, result.output
    assert not out.exists() and listing(tmp_path) == set()
    plan = printed_plan(result.stdout)
    assert sorted(plan, key=int) == LINEAR_LAYERS
    assert "recurrent state per sequence" in result.stdout
    assert "wrote" not in result.stdout and result.stdout.rstrip().endswith("dry run: nothing written")
    assert "asked: 38.9%" in result.stdout  # the default
    # Same calibration as the shared run, opposite direction: a different plan.
    assert plan != {layer: info["kept_heads"] for layer, info in record["layers"].items()}


def test_dry_run_random_writes_nothing(fixture_model_path, tmp_path, stats_dir):
    out = tmp_path / "random"
    args = ["prune", fixture_model_path, "--method", "random", "--seed", "1", "--dry-run", "--stats", stats_dir]
    result = invoke(*args, "--out", out)
    assert result.exit_code == 0, result.output
    assert not out.exists() and listing(tmp_path) == set()
    assert "wrote" not in result.stdout
    plan = printed_plan(result.stdout)
    assert sorted(plan, key=int) == LINEAR_LAYERS
    kept_bytes = sum(len(heads) for heads in plan.values()) * HEAD_BYTES
    assert kept_bytes <= (1 - STATE_REDUCTION) * len(LINEAR_LAYERS) * HEADS * HEAD_BYTES

    again = invoke(*args)  # --dry-run needs no --out; the same seed gives the same plan
    assert again.exit_code == 0, again.output
    assert printed_plan(again.stdout) == plan


# 3. Saved statistics ---------------------------------------------------------------------------------------


def test_prune_reuses_saved_statistics(fixture_model_path, tmp_path, stats_dir, record, monkeypatch):
    def recalibrate(*args, **kwargs):
        raise AssertionError("prune recalibrated instead of using --stats")

    monkeypatch.setattr(compressor.pipeline, "collect_state_statistics", recalibrate)
    out = tmp_path / "out2"
    result = invoke("prune", fixture_model_path, "--method", "joint", "--remove", "high", "--stats", stats_dir,
                    "--out", out, "--no-verify", "--dry-run")
    assert result.exit_code == 0, result.output
    assert not out.exists()
    # analyze used the shared run's settings, so the statistics and hence the plan are the same.
    assert printed_plan(result.stdout) == {layer: info["kept_heads"] for layer, info in record["layers"].items()}


def test_prune_refuses_statistics_of_another_model(fixture_model_path, tmp_path, stats_dir):
    stats = StateStatistics.load(stats_dir)
    stats.heads = [HEADS] * (len(stats.heads) - 1) + [HEADS - 1]
    other = tmp_path / "other-stats"
    stats.save(other)
    before = listing(tmp_path)
    result = invoke("prune", fixture_model_path, "--method", "joint", "--stats", other, "--out", tmp_path / "out",
                    "--no-verify")
    assert_user_error(result, "statistics", "compress analyze")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("option", [("--samples", "4"), ("--calib", "text:other text"), ("--seq-len", "64")])
def test_prune_refuses_calibration_options_that_saved_statistics_make_unread(fixture_model_path, tmp_path, stats_dir,
                                                                             option):
    before = listing(tmp_path)
    result = invoke("prune", fixture_model_path, "--method", "norm", "--stats", stats_dir, *option, "--dry-run")
    message = assert_user_error(result, option[0], "no effect with --stats", "drop")
    assert message.count(option[0]) == 2, message
    assert listing(tmp_path) == before


@pytest.mark.parametrize("options", [
    ("--key-reduction", "0.5", "--key-method", "l1", "--samples", "3"),  # channels alone, by weights: no text read
    ("--method", "loss", "--every", "128"),  # the loss scorer reads the text, never the statistics' options
    ("--method", "norm", "--heal", "4096", "--seq-len", "64"),  # healing reads the text, not its windows
])
def test_prune_refuses_each_option_that_saved_statistics_leave_unread(fixture_model_path, stats_dir, options,
                                                                     tmp_path):
    result = invoke("prune", fixture_model_path, "--stats", stats_dir, *options, "--out", tmp_path / "out")
    assert_user_error(result, f"{options[-2]} has no effect with --stats")
    assert listing(tmp_path) == set()


def test_the_loss_scorer_with_saved_statistics_takes_calibration_options(fixture_model_path, stats_dir):
    """--method loss reads the calibration text even beside --stats: its options apply, so they are not refused."""
    result = invoke("prune", fixture_model_path, "--method", "loss", "--stats", stats_dir, "--samples", "2",
                    "--seq-len", "64", "--loss-seq-len", "32", "--dry-run")
    assert result.exit_code == 0, result.output


def test_channels_from_activations_with_saved_statistics_take_calibration_options(fixture_model_path, stats_dir):
    result = invoke("prune", fixture_model_path, "--key-reduction", "0.5", "--key-method", "rrqr", "--stats",
                    stats_dir, "--samples", "2", "--seq-len", "64", "--dry-run")
    assert result.exit_code == 0, result.output


def test_healing_after_saved_statistics_takes_its_calibration_text(fixture_model_path, stats_dir, tmp_path):
    """--heal trains on --calib, so --calib is not refused beside --stats (the run stops at --dry-run, refused by
    --heal itself)."""
    result = invoke("prune", fixture_model_path, "--method", "norm", "--stats", stats_dir, "--heal", "4096",
                    "--calib", EVAL_TEXT, "--dry-run")
    assert_user_error(result, "--heal trains and writes")


def test_prune_refuses_a_missing_statistics_folder(fixture_model_path, tmp_path):
    result = invoke("prune", fixture_model_path, "--method", "joint", "--stats", tmp_path / "nothing", "--dry-run")
    assert_user_error(result, "no statistics", "compress analyze")
    assert listing(tmp_path) == set()


# 4. Bad inputs ---------------------------------------------------------------------------------------------


def test_missing_model_folder(tmp_path, no_weights_load):
    result = invoke("prune", tmp_path / "no-such-model", "--out", tmp_path / "out")
    assert_user_error(result, "no-such-model", "does not exist")
    assert listing(tmp_path) == set()


def test_a_file_a_folder_without_config_and_a_broken_config_are_named(tmp_path, no_weights_load):
    (tmp_path / "model.txt").write_text("not a model")
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    assert_user_error(invoke("prune", tmp_path / "model.txt", "--out", tmp_path / "out"), "is a file")
    assert_user_error(invoke("prune", tmp_path / "empty", "--out", tmp_path / "out"), "no config.json")
    message = assert_user_error(invoke("prune", tmp_path / "broken", "--out", tmp_path / "out"), "config.json")
    assert "Hub" not in message
    assert listing(tmp_path) == {"model.txt", "empty", "broken", "broken/config.json"}


def test_unreachable_hub_id(tmp_path, no_weights_load, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    result = invoke("prune", "nobody/no-such-model", "--out", "out")
    assert_user_error(result, "nobody/no-such-model", "HF_HUB_OFFLINE")
    assert listing(tmp_path) == set()


def test_a_missing_folder_under_an_existing_one_is_called_a_missing_folder(tmp_path, no_weights_load, monkeypatch):
    """``out/typo`` has the form of a Hub id, but ``out`` is a local folder: the message says first that the
    folder does not exist, then why the Hub did not serve it either."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    message = assert_user_error(invoke("eval", "models/typo"), "model folder models/typo does not exist",
                                "HF_HUB_OFFLINE")
    assert message.index("does not exist") < message.index("Hub")
    assert listing(tmp_path) == {"models"}


def test_unsupported_model_type(tmp_path, no_weights_load):
    from transformers import LlamaConfig

    model = tmp_path / "llama"
    LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                vocab_size=32).save_pretrained(model)
    before = listing(tmp_path)
    result = invoke("prune", model, "--out", tmp_path / "out")
    assert_user_error(result, "llama", "supported model types", "qwen3_5_text")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("reduction", ["1.5", "0", "1", "-0.2"])
def test_state_reduction_out_of_range(fixture_model_path, tmp_path, no_model_load, reduction):
    result = invoke("prune", fixture_model_path, "--out", tmp_path / "out", "--state-reduction", reduction)
    assert_user_error(result, "--state-reduction", "strictly between 0 and 1")
    assert listing(tmp_path) == set()


def test_a_uniform_budget_says_it_may_remove_more_than_asked(fixture_model_path, stats_dir):
    """Whole heads in every layer: on the fixture (8 heads a layer) 38.9 % asks for 3.1 heads, so 4 go (50 %)."""
    result = invoke("prune", fixture_model_path, "--budget", "uniform", "--method", "norm", "--stats", stats_dir,
                    "--dry-run")
    assert result.exit_code == 0, result.output
    assert "(50.0% smaller; asked: 38.9%)" in result.stdout
    assert "budget: uniform" in result.stdout and "may remove more than asked" in result.stdout
    default = invoke("prune", fixture_model_path, "--method", "norm", "--stats", stats_dir, "--dry-run")
    assert default.exit_code == 0 and "budget: uniform" not in default.stdout, default.output


def test_budget_that_cannot_be_met(fixture_model_path, tmp_path, stats_dir):
    # Refused only once statistics exist (here reused; without --stats it comes after calibrating).
    result = invoke("prune", fixture_model_path, "--method", "joint", "--stats", stats_dir, "--out", tmp_path / "out",
                    "--state-reduction", "0.95", "--min-heads-per-layer", "2")
    message = assert_user_error(result, "95.0%", "cannot be met", "2 heads per layer")
    assert "75.0%" in message  # 2 of 8 heads kept in every layer
    assert listing(tmp_path) == set()


def test_an_output_folder_holding_a_user_file_is_refused_without_suggesting_overwrite(
        fixture_model_path, tmp_path, stats_dir, no_model_load):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = invoke("prune", fixture_model_path, "--method", "joint", "--stats", stats_dir, "--out", out, "--no-verify")
    message = assert_user_error(result, "keep.txt", "choose another --out")
    assert "pass --overwrite" not in message  # it would be refused too
    assert listing(tmp_path) == {"out", "out/keep.txt"}
    assert (out / "keep.txt").read_text() == "precious"


def test_overwrite_replaces_the_output_folder(fixture_model_path, tmp_path, stats_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (out / MARKER).write_text('{"written_by": "compressor", "pid": 1, "files": ["old.txt"]}')  # an earlier output
    result = invoke("prune", fixture_model_path, "--method", "joint", "--stats", stats_dir, "--out", out,
                    "--no-verify", "--overwrite")
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert "old.txt" not in names
    assert {"config.json", "compression.json", "README.md", "tokenizer.json"} <= names
    assert "verify" not in json.loads((out / "compression.json").read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no partial folder left beside it


def test_output_path_that_is_a_file(fixture_model_path, tmp_path, no_model_load):
    out = tmp_path / "out"
    out.write_text("not a folder")
    result = invoke("prune", fixture_model_path, "--out", out, "--overwrite")
    assert_user_error(result, "not a folder")
    assert out.read_text() == "not a folder"


def test_missing_eval_file(fixture_model_path, tmp_path, no_model_load):
    result = invoke("prune", fixture_model_path, "--out", tmp_path / "out", "--eval", tmp_path / "missing.txt")
    assert_user_error(result, "evaluation file", "does not exist")
    assert listing(tmp_path) == set()


@pytest.mark.parametrize(
    "options, words",
    [
        (["--eval-samples", "0"], ["--eval-samples", "at least 1"]),
        (["--eval-seq-len", "1"], ["--eval-seq-len", "at least 2"]),
        (["--max-shard-size", "banana"], ["--max-shard-size", "banana"]),
        (["--alpha", "2"], ["--alpha", "[0, 1]"]),
        (["--min-heads-per-layer", "0"], ["--min-heads-per-layer", "at least 1"]),
        (["--calib", "my_corpus"], ["calibration file", "my_corpus", "does not exist"]),
    ],
)
def test_bad_options_fail_before_the_model_loads(fixture_model_path, tmp_path, no_model_load, options, words):
    result = invoke("prune", fixture_model_path, "--out", tmp_path / "out", *options, *SMALL)
    assert_user_error(result, *words)
    assert listing(tmp_path) == set()


def test_output_folder_may_not_be_the_source(tmp_path, fixture_model_path):
    source = tmp_path / "model"
    shutil.copytree(fixture_model_path, source)
    before = listing(source)
    result = invoke("prune", source, "--out", source, "--overwrite", *SMALL)
    assert_user_error(result, "source model's folder")
    assert listing(source) == before


def test_missing_calibration_file(fixture_model_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("prune", fixture_model_path, "--out", "out", "--calib", "missing.txt", *SMALL)
    assert_user_error(result, "calibration file", "missing.txt", "does not exist")
    assert listing(tmp_path) == set()


def test_zero_samples(fixture_model_path, tmp_path, no_model_load):
    result = invoke("prune", fixture_model_path, "--out", tmp_path / "out", "--samples", "0")
    assert_user_error(result, "--samples", "at least 1")
    assert listing(tmp_path) == set()


def test_calibration_text_too_short(fixture_model_path, tmp_path):
    result = invoke("prune", fixture_model_path, "--out", tmp_path / "out", "--calib", "text:just a few words",
                    *SMALL)
    assert_user_error(result, "tokens", "--samples", "--seq-len")
    assert listing(tmp_path) == set()


def test_prune_needs_out_or_dry_run(fixture_model_path, tmp_path, no_model_load, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("prune", fixture_model_path)
    assert_user_error(result, "--out", "--dry-run")
    assert listing(tmp_path) == set()


def test_a_dry_run_refuses_the_output_folder_the_run_would_refuse(fixture_model_path, tmp_path, no_model_load,
                                                                  monkeypatch):
    """--dry-run writes nothing, and says so when the run itself would refuse --out (here a folder holding a
    user's file, with --overwrite); an interrupted run's staging folder beside it stays, as the dry run changes
    nothing."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    stale = tmp_path / ".out.partial-x"
    stale.mkdir()
    (stale / MARKER).write_text('{"written_by": "compressor", "state": "staging", "pid": 999999999, "files": []}')
    result = invoke("prune", fixture_model_path, "--out", "out", "--overwrite", "--dry-run")
    assert_user_error(result, "notes.txt", "compressor did not write")
    assert listing(tmp_path) == {"out", "out/notes.txt", ".out.partial-x", f".out.partial-x/{MARKER}"}


def test_push_to_hub_with_dry_run_is_refused(fixture_model_path, tmp_path, no_model_load, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("prune", fixture_model_path, "--dry-run", "--push-to-hub", "alice/pruned")
    assert_user_error(result, "--push-to-hub", "--dry-run")
    assert listing(tmp_path) == set()


def test_push_to_hub_without_the_reload_check_is_refused_before_anything_runs(fixture_model_path, tmp_path,
                                                                             no_model_load, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("prune", fixture_model_path, "--out", "out", "--no-verify", "--push-to-hub", "alice/pruned")
    assert_user_error(result, "--push-to-hub", "--no-verify", "compress push --unverified")
    assert listing(tmp_path) == set()


# 5. Help ---------------------------------------------------------------------------------------------------


def test_help_lists_commands_and_options():
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    for command in ("analyze", "prune", "push"):
        assert command in result.stdout

    result = invoke("prune", "--help")
    assert result.exit_code == 0, result.output
    for param in main.commands["prune"].params:  # every option is listed, with what it does
        if isinstance(param, click.Option):
            assert param.opts[0] in result.stdout and param.help, param.name
    assert re.search(r"--method \[[^]]*\]\s+auto: try every rule.*\[default: auto\]", " ".join(result.stdout.split()))


def test_push_refuses_a_folder_that_prune_did_not_write(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_never_printed")
    result = invoke("push", folder, "someone/model")
    message = assert_user_error(result, "refusing to push", "--unverified")
    assert "hf_secret_never_printed" not in result.output + message


def test_push_passes_each_flag_to_its_own_check(tmp_path, monkeypatch):
    """--unverified and --replace reach push_folder as themselves; the old --force is a usage error naming both."""
    import compressor.hub

    calls = []
    monkeypatch.setattr(compressor.hub, "push_folder", lambda *args, **kwargs: calls.append(kwargs) or "url")
    for flags in (["--unverified"], ["--replace"], []):
        assert invoke("push", tmp_path, "someone/model", *flags).exit_code == 0
    assert [(c["unverified"], c["replace"]) for c in calls] == [(True, False), (False, True), (False, False)]
    result = invoke("push", tmp_path, "someone/model", "--force")
    assert result.exit_code == 2 and "--unverified" in result.output and "--replace" in result.output
    assert len(calls) == 3
