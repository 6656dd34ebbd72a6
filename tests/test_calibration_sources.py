"""Calibration sources (JSON Lines, folders, Hub datasets), packing, measured time steps, and --stats checks."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from click.testing import CliRunner
from tiny_models import tiny_model
from transformers import AutoTokenizer

from compressor.calibration import MetricSums, StateStatistics, collect_state_statistics, measured_steps, states_handed_to
from compressor.calibration_text import check_source, read_documents, read_text, token_windows
from compressor.cli import main
from compressor.errors import CompressorError
from compressor.families import family_for
from compressor.metrics import state_metrics
from compressor.pipeline import CalibrationSettings, analyze
from compressor.layers import linear_layers


@pytest.fixture(scope="module")
def tokenizer(fixture_model_path):
    return AutoTokenizer.from_pretrained(fixture_model_path)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_json_lines_give_one_document_per_line_from_the_named_field(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": "first doc", "id": 1}, {"text": "second doc"}])
    path.write_text(path.read_text() + "\n")  # blank lines are skipped
    assert read_documents(str(path)) == (["first doc", "second doc"], f"{path} (field 'text')")
    other = write_jsonl(tmp_path / "other.jsonl", [{"body": "a b"}, {"body": "c d"}])
    assert read_documents(str(other), text_field="body")[0] == ["a b", "c d"]
    assert read_text(str(other), text_field="body")[0] == "a b\n\nc d"
    with pytest.raises(CompressorError, match=r"line 1 of .* has no string field 'text'; name the field with"):
        read_documents(str(other))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(CompressorError, match="line 2 of .* is not valid JSON"):
        read_documents(str(tmp_path / "bad.jsonl"))


def test_a_folder_gives_one_document_per_text_file_in_path_order(tmp_path):
    (tmp_path / "b.txt").write_text("bravo")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_text("charlie")
    (tmp_path / "a.rst").write_text("alpha")
    (tmp_path / "skip.bin").write_text("not text")
    assert read_documents(str(tmp_path)) == (["alpha", "bravo", "charlie"], str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CompressorError, match="holds no text files"):
        read_documents(str(tmp_path / "empty"))


def test_a_file_or_folder_without_text_is_refused_by_name(tmp_path):
    (tmp_path / "blank.txt").write_text(" \n\n ")
    with pytest.raises(CompressorError, match=f"calibration file {tmp_path / 'blank.txt'} holds no text."):
        read_documents(str(tmp_path / "blank.txt"))
    (tmp_path / "empty.md").write_text("")
    with pytest.raises(CompressorError, match=f"calibration folder {tmp_path} holds no text."):
        read_documents(str(tmp_path))
    (tmp_path / "words.txt").write_text("words")
    assert read_documents(str(tmp_path))[0] == [" \n\n ", "", "words"]  # a folder needs text in one file


def test_too_little_text_names_what_to_change(tokenizer):
    """Every window asked (samples None): only the length can help; a count asked: either."""
    text = " ".join(f"w{i}" for i in range(300))
    length = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    with pytest.raises(CompressorError) as error:
        token_windows(tokenizer, text, None, 2048, 0, "--eval-samples")
    assert str(error.value) == (f"the text has {length:,} tokens, enough for 0 samples of 2,048 tokens; lower "
                                "--eval-seq-len, or give more text.")
    with pytest.raises(CompressorError, match="enough for 0 samples of 2,048 tokens but 3 were asked; lower "
                                              "--samples or --seq-len, or give more text."):
        token_windows(tokenizer, text, 3, 2048, 0)


def test_truncate_gives_each_long_document_its_own_window_and_pack_cuts_across_documents(tokenizer):
    words = [f"w{i}" for i in range(400)]
    long_a, long_b, short = " ".join(words[:200]), " ".join(words[200:]), "tiny document"
    ids_a = tokenizer(long_a, add_special_tokens=False)["input_ids"]
    ids_b = tokenizer(long_b, add_special_tokens=False)["input_ids"]
    seq_len = 64
    assert min(len(ids_a), len(ids_b)) > 2 * seq_len
    truncated = token_windows(tokenizer, [long_a, short, long_b], None, seq_len, seed=0, packing="truncate")
    assert truncated.tolist() == [ids_a[:seq_len], ids_b[:seq_len]]  # the short document is skipped
    one = token_windows(tokenizer, [long_a, short, long_b], 1, seq_len, seed=3, packing="truncate")
    assert one.tolist() in ([ids_a[:seq_len]], [ids_b[:seq_len]])
    with pytest.raises(CompressorError, match=r"2 of 3 documents have at least 64 tokens, but 3 samples .*--packing pack"):
        token_windows(tokenizer, [long_a, short, long_b], 3, seq_len, seed=0, packing="truncate")

    packed = token_windows(tokenizer, [long_a, short, long_b], None, seq_len, seed=0, packing="pack")
    stream = tokenizer("\n\n".join([long_a, short, long_b]), add_special_tokens=False)["input_ids"]
    assert packed.shape == (len(stream) // seq_len, seq_len)
    assert packed.flatten().tolist() == stream[: packed.numel()]
    boundary = len(tokenizer(long_a, add_special_tokens=False)["input_ids"])
    assert boundary % seq_len != 0  # so a packed window spans the end of one document and the start of the next
    assert packed.shape[0] > len(truncated)


def test_a_hub_dataset_without_the_datasets_extra_is_one_clear_sentence(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    message = r"reading the Hub dataset wikitext needs the datasets extra: pip install 'compressor\[datasets\]'\."
    with pytest.raises(CompressorError, match=message):
        read_documents("hf:wikitext")
    with pytest.raises(CompressorError, match=message):
        check_source("hf:wikitext")
    from conftest import FIXTURE

    result = CliRunner().invoke(main, ["analyze", str(FIXTURE), "--calib", "hf:wikitext", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "needs the datasets extra" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()


def fake_datasets(rows=None, error: Exception | None = None):
    calls = []

    def load_dataset(repo, config, split, streaming):
        calls.append((repo, config, split, streaming))
        if error is not None:
            raise error
        return iter(rows)

    return types.SimpleNamespace(load_dataset=load_dataset), calls


def test_a_hub_dataset_offline_is_one_clear_sentence(monkeypatch):
    module, _ = fake_datasets(error=ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)\n"
                                                    "details follow"))
    monkeypatch.setitem(sys.modules, "datasets", module)
    with pytest.raises(CompressorError) as caught:
        read_documents("hf:wikitext", split="validation")
    assert str(caught.value) == (
        "could not stream the Hub dataset wikitext (split validation): "
        "Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)."
    )


def test_a_hub_dataset_is_streamed_until_the_character_budget(monkeypatch):
    rows = [{"content": f"row {i} " * 10} for i in range(100)]
    module, calls = fake_datasets(rows)
    monkeypatch.setitem(sys.modules, "datasets", module)
    documents, source = read_documents("hf:org/corpus:en", text_field="content", split="test", char_budget=200)
    assert calls == [("org/corpus", "en", "test", True)]
    assert documents == [r["content"] for r in rows[:4]]  # 4 × 60 characters reach the 200 budget
    assert source == "hf:org/corpus:en (split test, column 'content')"
    with pytest.raises(CompressorError, match="has no text column 'text'; name it with --text-field"):
        read_documents("hf:org/corpus:en", split="test")


def test_measured_steps_every_and_log():
    assert measured_steps(2048, steps="log") == [64, 128, 256, 512, 1024, 2048]
    assert measured_steps(1000, steps="log") == [64, 128, 256, 512, 1000]
    assert measured_steps(256) == [64, 128, 192, 256]
    assert measured_steps(500, every=128) == [128, 256, 384, 500]
    assert measured_steps(40) == [40]
    for every in (0, 96, -64):
        with pytest.raises(CompressorError, match="--every must be a positive multiple of 64"):
            measured_steps(512, every=every)
    with pytest.raises(CompressorError, match="--steps must be one of every, log"):
        measured_steps(512, steps="linear")


def test_chosen_steps_are_the_every_chunk_statistics_at_those_boundaries():
    model = tiny_model("qwen3_5")
    family = family_for(model.config)
    tokens = torch.randint(3, 96, (2, 200), generator=torch.Generator().manual_seed(0))
    full = collect_state_statistics(model, family, tokens, batch_size=2, progress=False)
    log = collect_state_statistics(model, family, tokens, batch_size=2, progress=False,
                                   times=measured_steps(200, steps="log"))
    assert full.times.tolist() == [64, 128, 192, 200]
    assert log.times.tolist() == [64, 128, 200]
    for name in full.mean:
        assert torch.allclose(log.mean[name], full.mean[name][[0, 1, 3]], equal_nan=True), name


def test_side_stream_only_when_a_group_is_reduced_before_the_last_forward_pass(monkeypatch):
    """Calibration hands MetricSums its device for a side stream only when the states fill a group (so that one is
    reduced while forward passes go on); with fewer, they are reduced once, after the last pass."""
    import compressor.calibration as calibration

    model = tiny_model("qwen3_5")
    family = family_for(model.config)
    states_per_sequence = 2 * sum(mixer.num_v_heads for mixer in linear_layers(model, family).values())  # 2 steps
    given = []

    class Recorder(calibration.MetricSums):
        def __init__(self, eps, side_device=None, **kwargs):
            given.append(side_device)
            super().__init__(eps, None, **kwargs)

    monkeypatch.setattr(calibration, "MetricSums", Recorder)
    tokens = torch.randint(3, 96, (3, 128), generator=torch.Generator().manual_seed(0))
    for group in (3 * states_per_sequence, 3 * states_per_sequence + 1):
        collect_state_statistics(model, family, tokens, batch_size=1, progress=False, group=group)
    collect_state_statistics(model, family, tokens, batch_size=1, progress=False, group=1, overlap=False)
    assert given == [torch.device("cpu"), None, None]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side stream exists on CUDA only")
def test_spectra_on_the_side_stream_change_no_statistic():
    model = tiny_model("qwen3_5").cuda()
    family = family_for(model.config)
    tokens = torch.randint(3, 96, (6, 256), generator=torch.Generator().manual_seed(0))
    beside, after = (collect_state_statistics(model, family, tokens, batch_size=2, progress=False, overlap=overlap,
                                              group=16)  # groups reduced while the forward pass goes on
                     for overlap in (True, False))
    for name in beside.mean:
        assert torch.equal(beside.mean[name].nan_to_num(), after.mean[name].nan_to_num()), name
        assert torch.equal(beside.std[name].nan_to_num(), after.std[name].nan_to_num()), name


def test_analyze_records_the_source_packing_and_steps(fixture_model_path, tmp_path):
    words = " ".join(f"token{i} and more words" for i in range(300))
    source = write_jsonl(tmp_path / "calib.jsonl", [{"body": words}, {"body": words[::-1]}, {"body": "short"}])
    out = tmp_path / "analysis"
    result = CliRunner().invoke(main, [
        "analyze", str(fixture_model_path), "--out", str(out), "--calib", str(source), "--text-field", "body",
        "--packing", "truncate", "--steps", "log", "--samples", "2", "--seq-len", "256", "--batch-size", "2",
    ])
    assert result.exit_code == 0, result.output
    stats = StateStatistics.load(out)
    assert stats.times.tolist() == [64, 128, 256]
    assert stats.settings["steps"] == "log" and stats.settings["packing"] == "truncate"
    assert stats.settings["source"] == f"{source} (field 'body')"
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["times"] == [64, 128, 256] and report["settings"]["steps"] == "log"
    every = analyze(str(fixture_model_path), CalibrationSettings(samples=2, seq_len=256, every=128), progress=False)
    assert every.times.tolist() == [128, 256] and every.settings["steps"] == "every 128 tokens"


def test_prune_refuses_statistics_with_other_state_shapes(fixture_model_path, tmp_path):
    stats = analyze(str(fixture_model_path), CalibrationSettings(samples=1, seq_len=64), progress=False)
    stats.state_shapes = [(d_k, d_v // 2) for d_k, d_v in stats.state_shapes]
    stats.save(tmp_path / "stats")
    result = CliRunner().invoke(main, ["prune", str(fixture_model_path), "--stats", str(tmp_path / "stats"),
                                       "--dry-run", "--method", "random"])
    assert result.exit_code == 1
    assert "states of shapes" in result.output and "run `compress analyze` on this model" in result.output


def test_statistics_are_the_mean_and_spread_of_every_state_metric():
    """collect_state_statistics, batch by batch, equals each metric of each captured state averaged over the sequences
    (and their standard deviation), under each metric's name."""
    model = tiny_model("qwen3_5")
    family = family_for(model.config)
    tokens = torch.randint(3, 96, (5, 200), generator=torch.Generator().manual_seed(1))
    stats = collect_state_statistics(model, family, tokens, batch_size=2, progress=False)

    captured = {}  # layer -> chunk states [N, H, chunks, d_k, d_v] of all sequences at once
    with states_handed_to(captured.__setitem__, linear_layers(model, family)), torch.no_grad():
        model.model(input_ids=tokens, use_cache=False)
    assert stats.layers == sorted(captured)
    for i, layer in enumerate(stats.layers):
        for name, values in state_metrics(captured[layer]).items():  # values [N, H, time]
            heads = values.shape[1]
            expected_mean = values.double().mean(0).T.float()
            expected_std = values.double().std(0, unbiased=False).T.float()
            torch.testing.assert_close(stats.mean[name][:, i, :heads], expected_mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(stats.std[name][:, i, :heads], expected_std, rtol=1e-4, atol=1e-5)


def test_metric_sums_in_groups_equal_layer_by_layer():
    """MetricSums reduces queued states in groups (one metric table for several layers and shapes); the sums equal those
    of every layer reduced on its own, whatever the group size."""
    generator = torch.Generator().manual_seed(2)
    handed = [(0, torch.randn(2, 3, 2, 8, 8, generator=generator)), (3, torch.randn(2, 2, 2, 8, 4, generator=generator)),
              (5, torch.randn(2, 4, 2, 8, 8, generator=generator)), (0, torch.randn(2, 3, 2, 8, 8, generator=generator))]
    results = []
    for group, left in ((1, 0), (20, 0), (10**6, 4)):  # each layer alone; two shapes together; everything at the end
        sums = MetricSums(1e-4, group=group)
        for layer, states in handed:
            sums.add(layer, states)
        assert len(sums.queue) == left
        results.append(sums.totals())
    for other in results[1:]:
        for part, expected in zip(other, results[0]):
            assert expected.keys() == part.keys() == {0, 3, 5}
            for layer in expected:
                for name in expected[layer]:
                    torch.testing.assert_close(part[layer][name], expected[layer][name], rtol=1e-12, atol=1e-12)
    assert results[0][0][0]["threshold_rank"].shape == (3, 2)  # [H, time] of layer 0, summed over both batches


def test_calibration_stops_after_the_last_linear_attention_layer():
    """Nothing after the last linear-attention mixer runs: not that layer's MLP, nor the final norm."""
    model = tiny_model("qwen3_5")
    family = family_for(model.config)
    last = model.model.layers[max(linear_layers(model, family))]
    called = []
    hooks = [module.register_forward_hook(lambda module, *_: called.append(module)) for module in (last.mlp, model.model.norm)]
    try:
        collect_state_statistics(model, family, torch.randint(3, 96, (2, 128)), batch_size=1, progress=False)
        assert called == []
        with torch.no_grad():
            model.model(input_ids=torch.randint(3, 96, (1, 16)))  # the hooks do fire on a plain forward pass
        assert called == [last.mlp, model.model.norm]
    finally:
        for hook in hooks:
            hook.remove()


def test_chosen_chunk_states_of_the_fla_path_are_those_chunks_states(monkeypatch):
    """chunk_gated_delta_rule_fla_states with chunk_index gathers, from fla's states before each chunk (h) and the final
    state, exactly the states after the chosen chunks, including the last one (fla's kernels stand in as PyTorch
    functions here: only the gathering is under test)."""
    import compressor.state_capture as state_capture

    pytest.importorskip("triton")
    batch, length, heads, dim, chunks = 2, 200, 3, 4, 4
    generator = torch.Generator().manual_seed(3)
    h = torch.randn(batch, chunks, heads, dim, dim, generator=generator)  # h[:, i]: the state before chunk i
    final = torch.randn(batch, heads, dim, dim, generator=generator)
    monkeypatch.setattr(state_capture, "_fla_l2norm", lambda x, output_dtype: (x.to(output_dtype),), raising=False)
    monkeypatch.setattr(state_capture, "_fla_cumsum", lambda g, **_: g, raising=False)
    monkeypatch.setattr(state_capture, "_fla_fwd_intra", lambda k, v, **_: (k, v, None), raising=False)
    monkeypatch.setattr(state_capture, "_fla_fwd_h", lambda u, **_: (h, u, final), raising=False)
    monkeypatch.setattr(state_capture, "_fla_fwd_o", lambda v, **_: v, raising=False)
    monkeypatch.setattr(state_capture, "states_dot_precision", lambda device: "ieee")
    q, k, v = (torch.randn(batch, length, heads, dim, generator=generator) for _ in range(3))
    g, beta = torch.zeros(batch, length, heads), torch.ones(batch, length, heads)
    every = state_capture.chunk_gated_delta_rule_fla_states(q, k, v, g, beta)[2]
    assert every.shape == (batch, heads, chunks, dim, dim)
    assert torch.equal(every[:, :, :-1], h[:, 1:].transpose(1, 2)) and torch.equal(every[:, :, -1], final)
    chosen = torch.tensor([0, 2, 3])
    picked = state_capture.chunk_gated_delta_rule_fla_states(q, k, v, g, beta, chunk_index=chosen)[2]
    assert torch.equal(picked, every.index_select(2, chosen))


def test_fla_path_takes_states_in_the_states_precision_and_the_output_in_tritons_default(monkeypatch):
    """The fla path runs fla's state kernels on float32 inputs with Triton's float32 dot products in
    states_dot_precision, and the output kernel (whose result is rounded to the model's dtype) in the precision the
    caller had, Triton's default; q and k are normalised from their own dtype into float32 (fla's kernels stand in
    as PyTorch functions that record what they were given)."""
    import compressor.state_capture as state_capture

    triton = pytest.importorskip("triton")
    if not hasattr(getattr(triton, "knobs", None), "language"):
        pytest.skip("this triton has no precision knob")
    language = triton.knobs.language
    monkeypatch.setattr(state_capture, "_triton", triton, raising=False)
    batch, length, heads, dim = 1, 128, 2, 4
    seen = {}

    def stand_in(name, result):
        def kernel(**tensors):
            seen[name] = (language.fp32_default, {key: t.dtype for key, t in tensors.items() if torch.is_tensor(t)})
            return result(tensors)
        return kernel

    l2norm = stand_in("l2norm", lambda t: (t["x"].to(t["output_dtype"]),))
    monkeypatch.setattr(state_capture, "_fla_l2norm", lambda x, output_dtype: l2norm(x=x, output_dtype=output_dtype),
                        raising=False)
    monkeypatch.setattr(state_capture, "_fla_cumsum", lambda g, **_: g, raising=False)
    monkeypatch.setattr(state_capture, "_fla_fwd_intra", stand_in("intra", lambda t: (t["k"], t["v"], None)),
                        raising=False)
    states = torch.zeros(batch, 2, heads, dim, dim)
    monkeypatch.setattr(state_capture, "_fla_fwd_h", stand_in("h", lambda t: (states, t["u"], states[:, 0])),
                        raising=False)
    monkeypatch.setattr(state_capture, "_fla_fwd_o", stand_in("o", lambda t: t["v"]), raising=False)
    monkeypatch.setattr(state_capture, "states_dot_precision", lambda device: "tf32x3")
    q, k, v = (torch.randn(batch, length, heads, dim, dtype=torch.bfloat16) for _ in range(3))
    g, beta = torch.zeros(batch, length, heads), torch.ones(batch, length, heads, dtype=torch.bfloat16)
    previous = language.fp32_default
    out = state_capture.chunk_gated_delta_rule_fla_states(q, k, v, g, beta)[0]
    assert out.dtype == torch.bfloat16 and language.fp32_default == previous != "tf32x3"
    assert seen["l2norm"] == ("tf32x3", {"x": torch.bfloat16})
    for kernel in ("intra", "h"):
        precision, dtypes = seen[kernel]
        assert precision == "tf32x3" and set(dtypes.values()) == {torch.float32}, kernel
    precision, dtypes = seen["o"]
    assert precision == previous and set(dtypes.values()) == {torch.float32}


def test_states_are_handed_to_the_sink_within_the_block_only():
    """states_handed_to gives every mixer a recurrence that hands its states over for the block and takes it away
    after it, also when the block fails; calibration leaves none behind."""
    model = tiny_model("qwen3_5")
    mixers = linear_layers(model, family_for(model.config))
    seen = {}
    with pytest.raises(RuntimeError, match="stop"), states_handed_to(seen.__setitem__, mixers), torch.no_grad():
        model.model(input_ids=torch.randint(3, 96, (1, 64)), use_cache=False)
        raise RuntimeError("stop")
    assert sorted(seen) == sorted(mixers) and all("recurrence" not in mixer.__dict__ for mixer in mixers.values())
    collect_state_statistics(model, family_for(model.config), torch.randint(3, 96, (1, 64)), progress=False)
    assert all("recurrence" not in mixer.__dict__ for mixer in mixers.values())
