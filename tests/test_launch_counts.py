"""What a prefill asks a GPU to launch, counted on the CPU (``scripts/count_launches.py``: the shipped forward's CUDA
path under Triton's interpreter): the shipped class launches no more than transformers' stock class, enters no
more Python functions, and never makes the host wait for the device. (fla's Gated DeltaNet launches one copy more
per layer than its stock class, v's into the packed layout; KDA also β's sigmoid: ``docs/benchmarks.md``.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from triton_interpreter import ROOT, interpreted_environment, skip_where_the_interpreter_fails_on


@pytest.mark.slow
def test_the_shipped_prefill_launches_no_more_than_the_stock_one_and_never_waits_for_the_gpu():
    """Qwen3.5, whose stock class runs fla's chunked kernels on a GPU: the shipped class, unpruned or pruned,
    launches at most what the stock class launches, enters at most as many Python functions, and no operator of its
    prefill reads the GPU from the host; a model also cut by query/key channels launches what one cut by heads
    does (its layers hand their query scale to the kernels)."""
    pytest.importorskip("fla.ops.gated_delta_rule")
    skip_where_the_interpreter_fails_on("fla's chunked kernels")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "count_launches.py"), "--families", "qwen3_5",
                             "--length", "16", "--channels"],  # the counts of 80 tokens, in less than half the time
                            capture_output=True, text=True, timeout=600, cwd=ROOT, env=interpreted_environment())
    assert result.returncode == 0, result.stderr[-3000:]
    counts = json.loads(result.stdout.splitlines()[-1])
    total = {variant: counts[variant]["triton"] + counts[variant]["torch"] for variant in ("source", "unpruned",
                                                                                         "pruned", "pruned_channels")}
    assert counts["source"]["triton"] > 0, counts  # the stock class runs fla's kernels, as on a GPU
    assert counts["unpruned"]["syncs"] == counts["pruned"]["syncs"] == counts["pruned_channels"]["syncs"] == 0, counts
    assert total["pruned"] <= total["unpruned"] <= total["source"], counts
    assert total["pruned_channels"] == total["pruned"], counts  # the query scale goes to the kernels
    assert 0 < counts["pruned"]["python_calls"] <= counts["source"]["python_calls"], counts  # the host's own work

