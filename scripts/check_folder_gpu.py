"""Check written folders on a CUDA GPU against the CPU: the shipped code's fla path (every head a packed sequence)
against its PyTorch path, through the folder's own code as a user loads it (``trust_remote_code``).

    python scripts/check_folder_gpu.py FOLDER [FOLDER ...] --out results.json

For each folder, on 2 x 300 random tokens: the logits on CUDA in float32 and bfloat16 against the CPU's float32
(max absolute difference, and the logits' scale), and 8 greedy tokens of cached ``generate`` on CUDA (float32)
against the CPU's. Prints one JSON object and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_inference import versions  # noqa: E402


def load(folder: Path, device: str, dtype: torch.dtype):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device,
                                                trust_remote_code=True).eval()


def check(folder: Path) -> dict:
    """GPU against CPU figures for one folder."""
    cpu = load(folder, "cpu", torch.float32)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(cpu.config.vocab_size, 4096), (2, 300), generator=generator)
    with torch.no_grad():
        reference = cpu(ids).logits
        cpu_tokens = cpu.generate(ids[:, :40], max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    result = {"class": type(cpu).__name__, "logit_scale": reference.abs().max().item()}
    for dtype in (torch.float32, torch.bfloat16):
        gpu = load(folder, "cuda", dtype)
        with torch.no_grad():
            logits = gpu(ids.cuda()).logits.float().cpu()
            figures = {"logits_max_abs_diff": (logits - reference).abs().max().item()}
            if dtype == torch.float32:
                tokens = gpu.generate(ids[:, :40].cuda(), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                      pad_token_id=0).cpu()
                figures["greedy_tokens_equal"] = torch.equal(tokens, cpu_tokens)
        result[str(dtype).removeprefix("torch.")] = figures
        del gpu
        torch.cuda.empty_cache()
    print(folder.name, json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = {"versions": versions(), "folders": {}}
    for folder in args.folders:
        results["folders"][folder.name] = check(folder)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
