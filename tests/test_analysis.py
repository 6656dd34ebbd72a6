"""The analyze report: Spearman, the largest-gap split, report.json/report.md/figures, and analyze on the fixture."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from compressor.analysis import (
    FIGURES,
    average_ranks,
    build_report,
    largest_gap_split,
    render_markdown,
    spearman,
    step_index,
    write_report,
)
from compressor.calibration import StateStatistics
from compressor.cli import main
from compressor.outputs import MARKER
from compressor.errors import CompressorError
from compressor.metrics import METRICS
from compressor.pipeline import CalibrationSettings, analyze

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_average_ranks_share_ties_and_spearman_matches_hand_values():
    assert average_ranks(torch.tensor([10.0, 20.0, 20.0, 5.0])).tolist() == [2.0, 3.5, 3.5, 1.0]
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(x, x.exp()) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    # ranks (1, 2, 3, 4, 5) against (2, 1, 4, 3, 5): 1 - 6·Σd² / (n(n² - 1)) = 1 - 6·4 / 120
    assert spearman(x, torch.tensor([2.0, 1.0, 4.0, 3.0, 5.0])) == pytest.approx(0.8)
    # with ties: Pearson correlation of the average ranks (1, 2.5, 2.5, 4) and (1, 2, 3, 4)
    assert spearman(torch.tensor([1.0, 2.0, 2.0, 3.0]), x[:4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert spearman(torch.ones(4), x[:4]) is None
    assert spearman(x[:1], x[:1]) is None


def test_largest_gap_split_cuts_at_the_widest_log_gap():
    values = torch.tensor([1.0, 2.0, 30.0, 3.0, 40.0])
    threshold, high = largest_gap_split(values)
    assert threshold == pytest.approx(math.expm1((math.log1p(3.0) + math.log1p(30.0)) / 2))
    assert high.tolist() == [False, False, True, False, True]
    # on the log scale 0 -> 3 (gap 1.39) is wider than 6 -> 14 (gap 0.76), on the linear scale it is not
    assert largest_gap_split(torch.tensor([0.0, 3.0, 6.0, 14.0]))[1].tolist() == [False, True, True, True]
    assert largest_gap_split(torch.tensor([3.0, 3.0])) == (None, pytest.approx(torch.tensor([False, False])))


def test_step_index_takes_the_first_boundary_at_or_after():
    times = torch.tensor([64, 128, 192])
    assert step_index(times, 128) == 1
    assert step_index(times, 100) == 1
    assert step_index(times, 500) == 2


def synthetic_statistics() -> StateStatistics:
    """Two layers (3 and 2 heads, padded to 3) over 3 steps: ranks grow linearly, layer 1 head 0 is high-rank."""
    ranks = torch.tensor([[1.0, 2.0, 3.0], [20.0, 2.5, float("nan")]])  # [layer, head] at the last step
    growth = torch.tensor([1 / 3, 2 / 3, 1.0])[:, None, None]
    mean = {name: growth * ranks * (i + 1) for i, name in enumerate(METRICS)}
    mean["threshold_rank"] = growth * ranks
    return StateStatistics(
        mean=mean, std={n: torch.zeros_like(v) for n, v in mean.items()}, times=torch.tensor([64, 128, 192]),
        layers=[0, 2], heads=[3, 2], state_shapes=[(32, 32), (32, 16)],
        settings={"eps": 1e-4, "samples": 2, "seq_len": 192, "tokens": 384, "source": "literal text", "seed": 0,
                  "model": "synthetic"},
    )


def test_report_labels_heads_and_summarises_every_metric():
    stats = synthetic_statistics()
    reversed_half = synthetic_statistics()
    reversed_half.mean = {n: -v for n, v in reversed_half.mean.items()}
    report = build_report(stats, (stats, reversed_half))
    strata = report["stratification"]
    assert strata["heads"] == {"low-rank": 4, "high-rank": 1}
    assert 3 * 2 / 3 < strata["threshold_rank"] < 20 * 2 / 3  # the time means are 2/3 of the final ranks
    first, second = report["layers"]
    assert (first["layer"], second["layer"]) == (0, 2) and len(second["heads"]) == 2
    assert [h["group"] for h in second["heads"]] == ["high-rank", "low-rank"]
    assert first["share"] == {"low-rank": 1.0, "high-rank": 0.0}
    assert second["share"] == {"low-rank": 0.5, "high-rank": 0.5}
    head = first["heads"][2]
    assert head["final"]["threshold_rank"] == 3.0 and head["mean"]["threshold_rank"] == pytest.approx(2.0)
    assert set(head["final"]) == set(METRICS) and head["final"]["nuclear_norm"] == pytest.approx(3.0 * 4)
    agreement = report["consistency"]
    assert (agreement["early_step_tokens"], agreement["final_step_tokens"]) == (128, 192)
    for name in ("threshold_rank", "nuclear_norm"):
        assert agreement[name]["early_vs_final"] == pytest.approx(1.0)
        assert agreement[name]["halves"] == pytest.approx(-1.0)
    assert build_report(stats)["consistency"]["threshold_rank"]["halves"] is None
    # Two steps: the last is t = 128 itself, and no later step is there to compare it with.
    stats.times = stats.times[:2]
    stats.mean, stats.std = ({name: v[:2] for name, v in d.items()} for d in (stats.mean, stats.std))
    short = build_report(stats)["consistency"]
    assert (short["early_step_tokens"], short["final_step_tokens"]) == (128, 128)
    assert short["threshold_rank"]["early_vs_final"] is None and short["nuclear_norm"]["early_vs_final"] is None
    markdown = render_markdown(build_report(stats), {key: "x.png" for key in ("heatmap", "curves", "histogram")})
    assert "| over time (n/a: no step after t = 128; raise --seq-len) |" in markdown
    assert "states measured at every 64 tokens up to t = 128." in markdown  # statistics without a steps setting
    stats.settings["steps"] = "log"
    markdown = render_markdown(build_report(stats), {key: "x.png" for key in ("heatmap", "curves", "histogram")})
    assert "states measured at 64, 128, 256, … tokens up to t = 128." in markdown
    assert report["settings"]["times"] == [64, 128, 192]


def test_write_report_writes_json_markdown_and_pngs(tmp_path):
    stats = synthetic_statistics()
    report = write_report(stats, None, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))
    for name in FIGURES.values():
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    markdown = (tmp_path / "report.md").read_text()
    for name in FIGURES.values():
        assert f"]({name})" in markdown
    assert "| 2 | 2 | 50% | 50% |" in markdown
    assert "| threshold rank | 1.000 | n/a |" in markdown
    assert "synthetic" in markdown and "largest gap" in markdown


def test_markdown_says_when_there_is_no_split():
    stats = synthetic_statistics()
    stats.mean["threshold_rank"] = torch.ones_like(stats.mean["threshold_rank"])
    report = build_report(stats)
    assert report["stratification"]["threshold_rank"] is None
    assert "no split" in render_markdown(report, FIGURES)


def test_analyze_refuses_a_non_empty_output_before_loading(tmp_path):
    (tmp_path / "old.txt").write_text("keep me")
    with pytest.raises(CompressorError, match="--overwrite"):
        analyze("no/such/model", CalibrationSettings(samples=2, seq_len=64), out_dir=tmp_path)
    result = CliRunner().invoke(main, ["analyze", "no/such/model", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert (tmp_path / "old.txt").read_text() == "keep me"


def test_analyze_on_the_fixture_writes_a_consistent_report(fixture_model_path, tmp_path):
    out = tmp_path / "analysis"
    out.mkdir()
    (out / "stale.txt").write_text("an earlier output's, replaced by --overwrite")
    (out / MARKER).write_text('{"written_by": "compressor", "files": ["stale.txt"]}')
    result = CliRunner().invoke(main, ["analyze", str(fixture_model_path), "--out", str(out), "--overwrite",
                                       "--samples", "8", "--seq-len", "1024", "--steps", "log"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MARKER, "stats.safetensors", "report.json", "report.md", *FIGURES.values()]
    )
    report = json.loads((out / "report.json").read_text())
    stats = StateStatistics.load(out)
    assert report["settings"]["samples"] == 8 and stats.settings["samples"] == 8
    assert stats.times.tolist() == [64, 128, 256, 512, 1024]
    assert sum(len(layer["heads"]) for layer in report["layers"]) == sum(stats.heads)
    agreement = report["consistency"]
    assert (agreement["early_step_tokens"], agreement["final_step_tokens"]) == (128, 1024)
    # measured (CPU, 8 × 1024 tokens): halves 0.989 (rank) and 0.982 (nuclear); t = 128 vs 1024: 0.945 and 0.922.
    # shared/README.md reports 0.99 and 0.98 on more sequences; fewer (4 × 1024) give a nuclear-norm 0.78.
    for name in ("threshold_rank", "nuclear_norm"):
        assert agreement[name]["halves"] > 0.9, name
        assert agreement[name]["early_vs_final"] > 0.9, name
