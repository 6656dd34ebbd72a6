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
    prefill reads the GPU from the host."""
    pytest.importorskip("fla.ops.gated_delta_rule")
    skip_where_the_interpreter_fails_on("fla's chunked kernels")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "count_launches.py"), "--families", "qwen3_5",
                             "--length", "32"],  # the counts of 80 tokens, in half the time (one chunk, not two)
                            capture_output=True, text=True, timeout=600, cwd=ROOT, env=interpreted_environment())
    assert result.returncode == 0, result.stderr[-3000:]
    counts = json.loads(result.stdout.splitlines()[-1])
    total = {variant: counts[variant]["triton"] + counts[variant]["torch"] for variant in ("source", "unpruned",
                                                                                         "pruned")}
    assert counts["source"]["triton"] > 0, counts  # the stock class runs fla's kernels, as on a GPU
    assert counts["unpruned"]["syncs"] == counts["pruned"]["syncs"] == 0, counts
    assert total["pruned"] <= total["unpruned"] <= total["source"], counts
    assert 0 < counts["pruned"]["python_calls"] <= counts["source"]["python_calls"], counts  # the host's own work


CHANNEL_VARIANTS = """
import sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import count_launches

for name, expected in (("gla", True), ("delta_net", False), ("kimi_linear", False)):
    variants, _ = count_launches.models(name, channels=True)
    assert ("pruned_channels" in variants) == expected, name
    if expected:
        from compressor.families import family_for
        from compressor.layers import linear_layers

        heads, channels = (linear_layers(variants[v], family_for(variants[v].config)) for v in ("pruned",
                                                                                             "pruned_channels"))
        assert [m.num_v_heads for m in heads.values()] == [m.num_v_heads for m in channels.values()], name
        assert all(m.query_scale is None and m.head_k_dim == 16 for m in heads.values()), name
        assert all(m.query_scale == 16**-0.5 and m.head_k_dim == 10 for m in channels.values()), name
print("ok")
"""


def test_count_launches_cuts_channels_only_where_a_family_and_its_heads_allow():
    """``--channels``: a variant cut by the same heads and 10 of 16 query/key channels at the source's query scale
    (GLA), none where the tiny model's heads have 8 channels (DeltaNet) or the family refuses channel cuts (Kimi
    Linear)."""
    pytest.importorskip("fla.ops.gla")
    result = subprocess.run([sys.executable, "-c", CHANNEL_VARIANTS, str(ROOT / "scripts"), str(ROOT / "tests")],
                            capture_output=True, text=True, timeout=300, cwd=ROOT, env=interpreted_environment())
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
