"""A synthetic model folder large enough to measure memory with: weights of a constant, written shard by shard."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from conftest import FIXTURE
from safetensors.torch import save_file

from compressor.loading import load_structure


def synthetic_source(folder: Path, layers: int = 8, value: float = 0.01) -> Path:
    """An 8-layer float32 Qwen3.5 text model (hidden 1024, MLP 4096, 16 value heads over 8 key heads of 64; layers
    3 and 7 full attention) of about 0.55 GB in 8 source shards, every weight ``value``; the fixture's tokenizer."""
    from transformers import AutoConfig

    config = AutoConfig.for_model("qwen3_5_text", vocab_size=1024, hidden_size=1024, intermediate_size=4096,
                                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                  linear_num_key_heads=8, linear_num_value_heads=16, linear_key_head_dim=64,
                                  linear_value_head_dim=64, dtype="float32")
    config.save_pretrained(folder)
    tensors = load_structure(str(folder)).model.state_dict()
    names = list(tensors)
    for part in range(8):
        save_file({n: torch.full(tensors[n].shape, value) for n in names[part::8]}, folder / f"part-{part}.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(FIXTURE / name, folder / name)
    assert sum(t.numel() * 4 for t in tensors.values()) > 500e6
    return folder


RSS = '''
def rss(field):
    """Bytes of /proc/self/status's VmRSS (now) or VmHWM (peak since the last reset)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
'''
"""Source of ``rss(field)``, for the measuring subprocesses."""

MEASURING_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
"""The environment of a measuring subprocess: blocks of 1 MiB and more are mapped on their own and returned when
freed. glibc otherwise raises that threshold after the first such free, and keeps later freed blocks in its heap,
so the peak RSS also counted memory nothing held any more (146-198 MiB for the same run, against 124-133 so)."""
