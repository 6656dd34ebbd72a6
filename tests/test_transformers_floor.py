"""The oldest transformers that pyproject.toml admits runs a pruned folder (reload, cached generation with left
padding), and an older one is refused at once, in one sentence, when the folder's code is imported."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from fresh_process import BLOCKER, FLA_BLOCKER
from tiny_models import PLANS, tiny_model

from compressor.export import write_model
from compressor.families import family_for
from compressor.layers import PruningPlan
from compressor.slicing import slim

PYPROJECT = Path(__file__).parent.parent / "pyproject.toml"
CHECK = BLOCKER + FLA_BLOCKER + """
import torch, transformers
from transformers import AutoModelForCausalLM
assert transformers.__version__.startswith(sys.argv[2]), transformers.__version__
ids = torch.load("ids.pt")
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
mask = torch.ones_like(ids)
mask[0, :4] = 0
with torch.no_grad():
    torch.save(model(ids).logits, "logits.pt")
    model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
"""


def floor() -> str:
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    return re.search(r"transformers>=([\d.]+)", " ".join(dependencies)).group(1)


def transformers_at(version: str, folder: Path) -> Path:
    """transformers ``version`` alone (no dependencies: the installed ones serve), in ``folder``; without compiling
    its thousands of modules to bytecode, which took most of the install's time (the checks import a few)."""
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target",
                           str(folder), f"transformers=={version}"], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.skip(f"transformers {version} could not be installed here (no package index?): {done.stderr[-300:]}")
    return folder


def run(version: str, site: Path, model: Path, workdir: Path) -> subprocess.CompletedProcess:
    script = workdir / "check.py"
    script.write_text(CHECK)
    return subprocess.run([sys.executable, str(script), str(model), version], cwd=workdir, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1",
                                                        "HF_MODULES_CACHE": str(workdir / f".modules-{version}"),
                                                        "PATH": "/usr/bin:/bin"})


@pytest.mark.slow
def test_the_oldest_admitted_transformers_runs_a_pruned_folder_and_an_older_one_is_refused(tmp_path):
    model = tiny_model("qwen3_5")
    family = family_for(model.config)
    slim(model, family, PruningPlan(kept=PLANS["uneven"]))
    write_model(model, family, tmp_path / "pruned")
    ids = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    oldest = floor()
    done = run(oldest, transformers_at(oldest, tmp_path / "oldest"), tmp_path / "pruned", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    with torch.no_grad():
        assert (torch.load(tmp_path / "logits.pt") - model(ids).logits).abs().max().item() <= 1e-4
    older = "5.20.0"
    refused = run(older, transformers_at(older, tmp_path / "older"), tmp_path / "pruned", tmp_path)
    assert refused.returncode != 0
    assert f"needs transformers >= {'.'.join(oldest.split('.')[:2])}, found {older}" in refused.stderr
