"""What a prefill asks a GPU to launch, counted on the CPU (``scripts/count_launches.py``: the shipped forward's CUDA
path under Triton's interpreter): the shipped class launches no more than transformers' stock class, and never
makes the host wait for the device."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from triton_interpreter import ROOT, interpreted_environment


@pytest.mark.slow
def test_the_shipped_prefill_launches_no_more_than_the_stock_one_and_never_waits_for_the_gpu():
    """Qwen3.5 (transformers' stock class, fla's kernels) and fla's GLA: the shipped class, unpruned or pruned,
    launches at most what the stock class launches (Qwen3.5) or exactly fla's kernels (GLA, whose direct forward
    takes the chunk count from the host), and no operator reads the GPU from the host (fla's public ``chunk_gla``
    on packed heads does, once per layer)."""
    pytest.importorskip("fla.ops.gla")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "count_launches.py"), "--families", "qwen3_5,gla"],
                            capture_output=True, text=True, timeout=600, cwd=ROOT, env=interpreted_environment())
    assert result.returncode == 0, result.stderr[-3000:]
    counts = {line["family"]: line for line in map(json.loads, result.stdout.splitlines())}

    def total(family: str, variant: str) -> int:
        return counts[family][variant]["triton"] + counts[family][variant]["torch"]

    for family in ("qwen3_5", "gla"):
        assert counts[family]["source"]["triton"] > 0, counts[family]  # the stock class runs fla's kernels
        for variant in ("unpruned", "pruned"):
            assert counts[family][variant]["syncs"] == 0, counts[family]
    assert total("qwen3_5", "pruned") <= total("qwen3_5", "unpruned") <= total("qwen3_5", "source"), counts
    assert counts["gla"]["pruned"]["triton"] == counts["gla"]["source"]["triton"], counts
