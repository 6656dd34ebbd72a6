"""compression.json as one typed value: strict reading, versioned, written by a real prune."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURE

from compressor.errors import CompressorError
from compressor.pipeline import prune
from compressor.record import FORMAT, CompressionRecord
from compressor.settings import CalibrationSettings, PruneSettings


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("record") / "pruned"
    settings = PruneSettings(method="rank", calibration=CalibrationSettings(samples=1, seq_len=128), verify=False)
    return prune(str(FIXTURE), out, settings, progress=False)


def test_the_written_record_reads_back_equal(written):
    read = CompressionRecord.read(written.out_dir)
    assert read == written.record and read.format == FORMAT
    assert read.method.remove == "low" and read.source == str(FIXTURE)
    assert "eval" not in json.loads((written.out_dir / "compression.json").read_text())  # unset: not written


def test_unknown_and_missing_fields_fail_loudly(written):
    data = written.record.to_dict()
    with pytest.raises(CompressorError, match="unknown field.*colour"):
        CompressionRecord.from_dict({**data, "colour": "red"})
    layers = {key: {k: v for k, v in layer.items() if k != "kept_heads"} for key, layer in data["layers"].items()}
    with pytest.raises(CompressorError, match="layer 0 lacks the field.*kept_heads"):
        CompressionRecord.from_dict({**data, "layers": layers})
    with pytest.raises(CompressorError, match="format 99"):
        CompressionRecord.from_dict({**data, "format": 99})


def test_a_format_1_record_still_loads(written):
    data = written.record.to_dict()
    del data["source"]
    data.update(format=1, base_model="/models/qwen")
    upgraded = CompressionRecord.from_dict(data)
    assert (upgraded.format, upgraded.source, upgraded.base_model) == (FORMAT, "/models/qwen", "/models/qwen")


def test_base_model_from_the_option_or_a_hub_cache_path(tmp_path):
    from compressor.accounting import base_model_id

    cached = tmp_path / "hub" / "models--Qwen--Qwen3.5-0.8B" / "snapshots" / "abc123"
    cached.mkdir(parents=True)
    assert base_model_id(str(cached), None) == "Qwen/Qwen3.5-0.8B"
    assert base_model_id(str(cached), "org/name") == "org/name"
    assert base_model_id(str(tmp_path), None) == str(tmp_path)


def test_the_licence_is_copied_from_the_source_model_card(tmp_path):
    import shutil

    source = tmp_path / "source"
    shutil.copytree(FIXTURE, source)
    (source / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: en\n---\n\n# A model\n")
    settings = PruneSettings(method="norm", calibration=CalibrationSettings(samples=1, seq_len=128), dry_run=True)
    assert prune(str(source), None, settings, progress=False).record.license == "apache-2.0"
    (source / "README.md").write_text("# No front matter\n")
    assert prune(str(source), None, settings, progress=False).record.license is None
