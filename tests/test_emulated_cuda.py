"""Every family's shipped forward on its CUDA path, run on the CPU (``emulated_cuda.py``: Triton's interpreter runs
fla's kernels, and tensors report ``is_cuda``): pruned against masked logits, cached greedy decoding, and which
chunked forward each layer calls. The CUDA tests cover what this cannot: decode graphs, the GPU's own tile
configurations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from triton_interpreter import ROOT, interpreted_environment, skip_where_the_interpreter_fails_on

TOLERANCE = 2e-4  # fla's float32 kernels against the PyTorch path; a wrong slice or argument moves logits by O(1)
SLOW = pytest.mark.slow  # the fast subset keeps two: a Gated DeltaNet of transformers' and fla's GLA

FLA_LAYOUT_LAYERS = {"gated_deltanet_gva": 1, "kda_gva": 1, "gla": 1}
"""Layers whose prefill runs in fla's own layout instead of packed heads, by model: the last layer, which the plan
leaves all its heads, of fla's grouped Gated DeltaNet and KDA (value heads that share key heads) and of GLA
(token-major at the model's head count, its query/key channels cut or not). The other families' layers pack their
heads."""

MODELS = [
    ("qwen3_5", 80, "heads", "float32"),
    ("gla", 80, "channels", "float32"),  # one value head per key head; the unpruned layer token-major
    pytest.param("qwen3_next_moe", 80, "channels", "float32", marks=SLOW),  # grouped projections, uneven groups
    pytest.param("olmo_hybrid", 80, "heads", "float32", marks=SLOW),  # negative eigenvalues (beta in (0, 2))
    # value heads share key heads; the plan keeps every head of the last layer, which takes fla's layout for them
    pytest.param("gated_deltanet_gva", 80, "heads", "float32", marks=SLOW),
    pytest.param("gated_deltanet", 80, "heads", "float32", marks=SLOW),  # one value head per key head
    pytest.param("delta_net", 80, "heads", "bfloat16", marks=SLOW),  # fla's DeltaNet kernels refuse float32
    pytest.param("kda_gva", 20, "heads", "float32", marks=SLOW),  # KDA's kernels: slow under the interpreter
    pytest.param("kimi_linear", 20, "heads", "float32", marks=SLOW),
]


@pytest.mark.parametrize("name, length, plan, dtype", MODELS)
def test_the_cuda_path_of_a_pruned_model_equals_the_masked_model(name, length, plan, dtype):
    """A prompt of two sequences, the second left-padded, prefilled but for its last token (79 tokens: a whole
    64-token chunk and part of the next; KDA's 19) with and without autograd (without it in two calls, the second
    continuing from the first's cache: the recurrences' initial states), then ``generate`` from the cache of the
    prefill without autograd: three decode steps, greedy; the plan removes heads, or heads and query/key
    channels. The direct chunked forward runs in every layer of that prefill, never under autograd, and not again in
    ``generate`` (it would if the cache were ignored); the layers ``FLA_LAYOUT_LAYERS`` counts run in fla's own
    layout. In bfloat16 the masked model runs the same path, and the logits are equal. Before pruning, the shipped
    class gives the stock class's logits on the model's weights, both on the CUDA path (bfloat16: equal)."""
    pytest.importorskip("fla.ops.kda")
    skip_where_the_interpreter_fails_on("fla's chunked kernels")
    script = Path(__file__).with_name("emulated_cuda.py")
    result = subprocess.run([sys.executable, str(script), name, str(length), plan, dtype], capture_output=True,
                            text=True, timeout=600, cwd=ROOT, env=interpreted_environment())
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.splitlines()[-1])
    assert figures["scale"] > 1
    tolerance = TOLERANCE if dtype == "float32" else 0
    for what in ("prefill", "autograd"):
        assert figures[what] <= tolerance, (what, figures)
    assert figures["same_tokens"] and max(figures["steps"]) <= tolerance, figures
    assert figures["direct_without_grad"] == 2 * figures["layers"], figures  # the prefill's two calls
    assert figures["direct_with_grad"] == 0, figures
    assert figures["fla_layout"] == 2 * FLA_LAYOUT_LAYERS.get(name, 0), figures
    stock = figures["stock"]  # unpruned, every layer of the grouped fla models and GLA takes fla's own layout
    assert stock["difference"] <= tolerance, stock
    assert stock["fla_layout"] == (figures["layers"] if name in FLA_LAYOUT_LAYERS else 0), stock
