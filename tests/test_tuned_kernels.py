"""The fla launch configurations recorded on known GPUs: valid for fla's own reader, found by it inside
``recorded_fla_configs`` (and only there), and in force while ``prune``, ``analyze`` and ``eval`` run."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
fla_cache = pytest.importorskip("fla.ops.utils.cache")

from compressor import pipeline, quality, tuned_kernels  # noqa: E402
from compressor.tuned_kernels import RECORDED, recorded_fla_configs  # noqa: E402

H200 = RECORDED / "NVIDIA_H200"
RECORDED_FILES = sorted(RECORDED.glob("*/*.json"))
KERNEL_MODULES = ["fla.modules.norm.l2norm", "fla.ops.utils.cumsum", "fla.ops.common.chunk_delta_h",
                  "fla.ops.common.chunk_o", "fla.ops.gated_delta_rule.chunk_fwd", "fla.ops.gated_delta_rule.wy_fast"]


def fla_tuners() -> dict[str, object]:
    """Kernel name -> fla's config-file autotuner of that name, in the modules the recorded kernels come from."""
    kernels = (value for name in KERNEL_MODULES for value in vars(importlib.import_module(name)).values())
    tuners = (tuned_kernels.config_file_autotuner(value) for value in kernels if hasattr(value, "fn"))
    return {tuner.kernel_name: tuner for tuner in tuners if tuner is not None}


@pytest.mark.parametrize("gpu", ["NVIDIA_H200", "NVIDIA_H100_80GB_HBM3"])
def test_configurations_are_recorded_for_the_h200_and_the_h100(gpu):
    assert {path.stem for path in (RECORDED / gpu).glob("*.json")} >= {
        "chunk_fwd_kernel_o", "recompute_w_u_fwd_kernel", "chunk_gated_delta_rule_fwd_kernel_h_blockdim64"}


@pytest.mark.parametrize("path", RECORDED_FILES, ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_each_recorded_file_is_read_by_fla_and_sets_only_what_the_kernel_tunes(path):
    parsed = fla_cache.KernelConfigFile.from_file(path)
    assert parsed is not None and parsed.kernel_name == path.stem and parsed.autotune_entries
    tuner = fla_tuners()[path.stem]
    tuned = set().union(*(config.kwargs for config in tuner.configs))
    for digest, entry in parsed.autotune_entries.items():
        assert fla_cache.AutotuneKey.key_hash(entry["autotune_key"]) == digest
        assert len(entry["autotune_key"]) > len(tuner.keys)  # the kernel's key arguments, then tensor dtypes
        assert set(entry["config"]["kwargs"]) <= tuned
        assert entry["config"]["num_warps"] in (1, 2, 4, 8, 16, 32) and entry["config"]["num_stages"] >= 1


def recorded_entry(kernel: str) -> dict:
    return next(iter(json.loads((H200 / f"{kernel}.json").read_text())["autotune_entries"].values()))


def test_fla_finds_the_recorded_configurations_inside_the_block_only(monkeypatch):
    monkeypatch.delenv("FLA_CACHE_MODE", raising=False)
    monkeypatch.delenv("FLA_CONFIG_DIR", raising=False)
    entry = recorded_entry("chunk_fwd_kernel_o")
    key = entry["autotune_key"]
    other_sizes = [n * 2 if isinstance(n, int) and not isinstance(n, bool) else n for n in key]
    other_dtype = [("torch.float16" if n == key[-1] else n) for n in key]
    monkeypatch.setattr(fla_cache, "FLA_CACHE_MODE", fla_cache.FlaCacheMode.DISABLED)  # fla's default
    with recorded_fla_configs(H200) as used:
        assert used and os.environ["FLA_CONFIG_DIR"] == str(H200)
        lookup = lambda k: fla_cache.load_cached_config("chunk_fwd_kernel_o", fla_cache.AutotuneKey(tuple(k)))  # noqa: E731
        assert lookup(key) == entry["config"]
        assert lookup(other_sizes) == entry["config"]  # sizes differ: fla's fuzzy match
        assert lookup(other_dtype) is None  # another dtype: fla autotunes
    assert fla_cache.FLA_CACHE_MODE is fla_cache.FlaCacheMode.DISABLED and "FLA_CONFIG_DIR" not in os.environ
    assert fla_cache.load_cached_config("chunk_fwd_kernel_o", fla_cache.AutotuneKey(tuple(key))) is None


def test_the_block_restores_fla_after_an_error(monkeypatch):
    monkeypatch.delenv("FLA_CACHE_MODE", raising=False)
    monkeypatch.delenv("FLA_CONFIG_DIR", raising=False)
    monkeypatch.setattr(fla_cache, "FLA_CACHE_MODE", fla_cache.FlaCacheMode.DISABLED)
    with pytest.raises(KeyError), recorded_fla_configs(H200) as used:
        assert used and fla_cache.FLA_CACHE_MODE is fla_cache.FlaCacheMode.FUZZY
        raise KeyError("inside")
    assert fla_cache.FLA_CACHE_MODE is fla_cache.FlaCacheMode.DISABLED and "FLA_CONFIG_DIR" not in os.environ


@pytest.mark.parametrize("variable", ["FLA_CACHE_MODE", "FLA_CONFIG_DIR"])
def test_a_users_fla_variable_stands(monkeypatch, variable):
    monkeypatch.setattr(fla_cache, "FLA_CACHE_MODE", fla_cache.FlaCacheMode.DISABLED)
    monkeypatch.setenv(variable, "strict" if variable == "FLA_CACHE_MODE" else "/somewhere")
    with recorded_fla_configs(H200) as used:
        assert not used and fla_cache.FLA_CACHE_MODE is fla_cache.FlaCacheMode.DISABLED


def test_a_mode_set_in_code_and_an_enclosing_block_stand(monkeypatch):
    monkeypatch.delenv("FLA_CACHE_MODE", raising=False)
    monkeypatch.delenv("FLA_CONFIG_DIR", raising=False)
    monkeypatch.setattr(fla_cache, "FLA_CACHE_MODE", fla_cache.FlaCacheMode.STRICT)
    with recorded_fla_configs(H200) as used:
        assert not used and fla_cache.FLA_CACHE_MODE is fla_cache.FlaCacheMode.STRICT
    monkeypatch.setattr(fla_cache, "FLA_CACHE_MODE", fla_cache.FlaCacheMode.DISABLED)
    with recorded_fla_configs(H200) as outer:
        with recorded_fla_configs(H200) as inner:
            assert outer and not inner
        assert fla_cache.FLA_CACHE_MODE is fla_cache.FlaCacheMode.FUZZY and os.environ["FLA_CONFIG_DIR"] == str(H200)
    assert fla_cache.FLA_CACHE_MODE is fla_cache.FlaCacheMode.DISABLED and "FLA_CONFIG_DIR" not in os.environ


@pytest.mark.parametrize("gpu, fits, expected", [("NVIDIA_H200", True, H200), ("NVIDIA_H200", False, None),
                                                 ("Some_Other_GPU", True, None)])
def test_the_folder_is_the_one_recorded_for_this_gpu_if_it_fits_the_installed_fla(monkeypatch, gpu, fits, expected):
    monkeypatch.setattr(tuned_kernels.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fla_cache, "get_gpu_info", lambda: gpu)
    monkeypatch.setattr(tuned_kernels, "fits_installed_fla", lambda folder: fits)
    assert tuned_kernels.recorded_folder() == expected


def candidates_here(tmp_path: Path, change=None) -> Path:
    """The H200 files with every configuration replaced by its kernel's first candidate on this machine (fla's
    candidates depend on the hardware), then ``change(content)`` applied to each file's content."""
    folder = tmp_path / f"recorded-{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    tuners = fla_tuners()
    for path in RECORDED_FILES:
        if path.parent != H200:
            continue
        content = json.loads(path.read_text())
        first = tuners[content["kernel_name"]].configs[0]
        for entry in content["autotune_entries"].values():
            entry["config"] = tuned_kernels.as_recorded(first)
        if change is not None:
            change(content)
        (folder / path.name).write_text(json.dumps(content))
    return folder


def test_recorded_configurations_are_used_only_as_candidates_of_the_installed_fla(tmp_path):
    def other_version(content):
        content["fla_version"] = "0.5.0"

    def not_a_candidate(content):
        for entry in content["autotune_entries"].values():
            entry["config"]["num_warps"] = 64

    def kernel_gone(content):
        content["kernel_name"] = "a_kernel_fla_renamed"

    def module_gone(content):
        content["module"] = "fla.a_module_fla_removed"

    def no_module_named(content):
        del content["module"]

    def config_cut(content):
        for entry in content["autotune_entries"].values():
            del entry["config"]["num_stages"]

    assert tuned_kernels.fits_installed_fla(candidates_here(tmp_path))
    for change in (other_version, not_a_candidate, kernel_gone, module_gone, no_module_named, config_cut):
        assert not tuned_kernels.fits_installed_fla(candidates_here(tmp_path, change)), change.__name__
    broken = candidates_here(tmp_path)
    (broken / "l2norm_fwd_kernel.json").write_text("{ not json")
    assert not tuned_kernels.fits_installed_fla(broken)


def test_recorded_configurations_are_not_used_without_a_version_of_fla_kernels(monkeypatch, tmp_path):
    def no_distribution(name):
        raise tuned_kernels.metadata.PackageNotFoundError(name)

    folder = candidates_here(tmp_path)
    monkeypatch.setattr(tuned_kernels.metadata, "version", no_distribution)
    assert not tuned_kernels.fits_installed_fla(folder)


def test_no_folder_without_cuda(monkeypatch):
    monkeypatch.setattr(tuned_kernels.torch.cuda, "is_available", lambda: False)
    assert tuned_kernels.recorded_folder() is None


class Stop(Exception):
    pass


@pytest.mark.parametrize("command", ["prune", "analyze", "evaluate"])
def test_prune_analyze_and_eval_run_with_the_recorded_configurations(monkeypatch, command):
    monkeypatch.delenv("FLA_CACHE_MODE", raising=False)
    monkeypatch.delenv("FLA_CONFIG_DIR", raising=False)
    monkeypatch.setattr(tuned_kernels, "recorded_folder", lambda: H200)
    seen = []

    def first_step(*args, **kwargs):
        seen.append((fla_cache.FLA_CACHE_MODE, os.environ.get("FLA_CONFIG_DIR")))
        raise Stop

    monkeypatch.setattr(pipeline, "check_prune_inputs", first_step)
    monkeypatch.setattr(pipeline, "check_source", first_step)
    monkeypatch.setattr(quality, "load_model", first_step)
    fixture = str(Path("tests/fixtures/qwen35-tiny-6m"))
    call = {"prune": lambda: pipeline.prune(fixture, None), "analyze": lambda: pipeline.analyze(fixture),
            "evaluate": lambda: quality.evaluate(fixture)}[command]
    with pytest.raises(Stop):
        call()
    assert seen == [(fla_cache.FlaCacheMode.FUZZY, str(H200))]


def test_the_recorder_writes_what_autotuning_chose_and_fla_reads_it_back(tmp_path, monkeypatch):
    monkeypatch.setenv("FLA_CACHE_MODE", "restored after the test")  # the script sets it when imported
    spec = importlib.util.spec_from_file_location("record_fla_configs",
                                                  Path(__file__).parents[1] / "scripts" / "record_fla_configs.py")
    recorder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recorder)
    monkeypatch.delenv("FLA_CACHE_MODE")
    monkeypatch.setattr(fla_cache, "FLA_CACHE_MODE", fla_cache.FlaCacheMode.DISABLED)
    import triton

    tuner = fla_tuners()["chunk_fwd_kernel_o"]
    first, second = tuner.configs[:2]
    float32_key, bfloat16_key = [tuple(entry["autotune_key"]) for entry in list(
        json.loads((H200 / "chunk_fwd_kernel_o.json").read_text())["autotune_entries"].values())[:2]]
    monkeypatch.setitem(tuner.cache, float32_key, first)
    recorder.write(tuned_kernels.autotuned_fla_configs(), tmp_path)
    content = json.loads((tmp_path / "chunk_fwd_kernel_o.json").read_text())
    assert content["module"] == "fla.ops.common.chunk_o" and tuned_kernels.fits_installed_fla(tmp_path)
    with recorded_fla_configs(tmp_path):
        read = fla_cache.load_cached_config("chunk_fwd_kernel_o", fla_cache.AutotuneKey(float32_key))
    assert tuned_kernels.candidate_of(read) == tuned_kernels.candidate_of(tuned_kernels.as_recorded(first))

    del tuner.cache[float32_key]  # a second recording adds its keys and keeps the first's
    monkeypatch.setitem(tuner.cache, bfloat16_key, triton.Config(dict(second.kwargs), num_warps=second.num_warps,
                                                                 num_stages=second.num_stages))
    recorder.write(tuned_kernels.autotuned_fla_configs(), tmp_path)
    entries = json.loads((tmp_path / "chunk_fwd_kernel_o.json").read_text())["autotune_entries"]
    assert set(entries) == {fla_cache.AutotuneKey.key_hash(key) for key in (float32_key, bfloat16_key)}

    foreign = tmp_path / "elsewhere"  # a file of the same name that the recorder did not write stays as it was
    foreign.mkdir()
    (foreign / "chunk_fwd_kernel_o.json").write_text('{"a user": "file"}')
    with pytest.raises(SystemExit, match="not a recorded configuration"):
        recorder.write(tuned_kernels.autotuned_fla_configs(), foreign)
    assert (foreign / "chunk_fwd_kernel_o.json").read_text() == '{"a user": "file"}'
    (foreign / "chunk_fwd_kernel_o.json").write_text("not json")
    with pytest.raises(SystemExit, match="not a recorded configuration"):
        recorder.write(tuned_kernels.autotuned_fla_configs(), foreign)
    assert (foreign / "chunk_fwd_kernel_o.json").read_text() == "not json"


def test_autotuned_configurations_list_what_a_kernel_holds_and_nothing_without_fla(monkeypatch):
    tuner = fla_tuners()["chunk_fwd_kernel_o"]
    key = tuple(recorded_entry("chunk_fwd_kernel_o")["autotune_key"])
    monkeypatch.setitem(tuner.cache, key, tuner.configs[1])
    held = tuned_kernels.autotuned_fla_configs()["chunk_fwd_kernel_o"]
    assert held["module"] == "fla.ops.common.chunk_o"
    assert held["autotune_entries"][fla_cache.AutotuneKey.key_hash(key)] == {
        "autotune_key": list(key), "config": tuned_kernels.as_recorded(tuner.configs[1])}
    json.dumps(held)  # written into the speed scripts' JSON as it is
    monkeypatch.setitem(sys.modules, "fla.ops.utils.cache", None)  # fla absent: import fails
    assert tuned_kernels.autotuned_fla_configs() == {}
