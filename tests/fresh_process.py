"""Run a script in a fresh Python process in which ``compressor`` cannot be imported."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch


def import_blocker(package: str) -> str:
    """A prelude (Python source) after which ``package`` and its submodules cannot be imported."""
    return textwrap.dedent(
        f"""
        import sys

        class _Block_{package}:
            def find_spec(self, name, path=None, target=None):
                if name == "{package}" or name.startswith("{package}."):
                    raise ImportError("{package} is blocked in this process")

        sys.meta_path.insert(0, _Block_{package}())
        """
    )


BLOCKER = import_blocker("compressor")
FLA_BLOCKER = import_blocker("fla")
"""A prelude after which ``fla`` cannot be imported: what a folder of a transformers family meets where fla is
absent (its shipped code must then run the PyTorch path)."""


def run_without_compressor(script: str, workdir: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``script`` (Python source) with ``compressor`` blocked, in ``workdir``; raise with its output on failure."""
    path = workdir / "fresh_script.py"
    path.write_text(BLOCKER + textwrap.dedent(script))
    # Its own cache of remote code: transformers keys it by folder name, and tests reuse folder names across runs.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "HF_MODULES_CACHE": str(workdir / ".modules")}
    done = subprocess.run([sys.executable, str(path)], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"fresh process failed:\n{done.stdout}\n{done.stderr[-4000:]}")
    return done


STOCK_DISPATCH = """
import inspect
stock_class = next(c for c in type(model).__mro__ if c.__module__.startswith("transformers.models."))
stock_chooses = "@use_experts_implementation" in inspect.getsource(sys.modules[stock_class.__module__])
assert model.config._experts_implementation == ("grouped_mm" if stock_chooses else "eager"), type(model)
for klass in type(model).__mro__:  # transformers caches its verdict on a class, and subclasses inherit it
    if "_can_set_experts_implementation_cached_value" in vars(klass):
        delattr(klass, "_can_set_experts_implementation_cached_value")
"""
"""A check (``model`` in scope) that a loaded model's MoE experts run the kernel its stock class would choose
(transformers lets a class choose only if its own module uses ``@use_experts_implementation``; otherwise the
experts run a Python loop); it then forgets the cached verdicts, so that the next folder's class decides afresh."""


RELOAD = """
import torch
from transformers import AutoModelForCausalLM
inputs = torch.load("inputs.pt")
out = {{}}
for name in inputs["folders"]:
    model, info = AutoModelForCausalLM.from_pretrained(
        name, trust_remote_code=True, dtype=torch.float32, output_loading_info=True)
    model.eval()
{checks}
    with torch.no_grad():
        out[name] = model(inputs["ids"]).logits
{generate}
torch.save(out, "logits.pt")
"""


def reloaded_logits(folders: list[str], ids: torch.Tensor, workdir: Path, checks: str = "", generate: bool = True,
                    prelude: str = "") -> dict[str, torch.Tensor]:
    """Load each model folder of ``folders`` (below ``workdir``) with ``AutoModelForCausalLM`` in a process where
    compressor cannot be imported: its logits on ``ids`` by folder name. ``checks`` runs after each load (``name``,
    ``model`` and the loading ``info`` in scope); with ``generate`` each model also generates 3 tokens with its
    cache; ``prelude`` runs first."""
    torch.save({"ids": ids, "folders": list(folders)}, workdir / "inputs.pt")
    generation = "        model.generate(inputs['ids'][:, :20], max_new_tokens=3, do_sample=False, pad_token_id=0)"
    script = textwrap.dedent(prelude) + RELOAD.format(
        checks=textwrap.indent(textwrap.dedent(checks), "    "), generate=generation if generate else "")
    run_without_compressor(script, workdir)
    return torch.load(workdir / "logits.pt")
