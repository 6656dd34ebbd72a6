"""The teacher's top-k log-probabilities cached to disk, for a teacher too big to run beside the student."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

from .losses import POSITIONS_PER_CHUNK


class TopKCache:
    """Windows and the teacher's top-k log-probabilities at each of their positions, in safetensors files of
    ``group`` windows each (float16 log-probabilities and int32 token ids: 6·k bytes per position)."""

    def __init__(self, folder: Path, k: int):
        self.folder, self.k = folder, k
        self.files: list[Path] = []
        self.sizes: list[int] = []

    def add(self, teacher, windows) -> None:
        """Run ``teacher`` on ``windows`` [n, T] (in batches of 8) and append their top-k to the cache."""
        import torch
        import torch.nn.functional as F
        from safetensors.torch import save_file

        device = next(teacher.parameters()).device
        logprobs, ids = [], []
        with torch.no_grad():
            for batch in windows.split(8):
                hidden = teacher.get_decoder()(input_ids=batch.to(device), use_cache=False).last_hidden_state
                head = teacher.get_output_embeddings()
                for chunk in hidden.flatten(0, 1).split(POSITIONS_PER_CHUNK):
                    top = F.log_softmax(head(chunk).float(), dim=-1).topk(self.k, dim=-1)
                    logprobs.append(top.values.half().cpu())
                    ids.append(top.indices.int().cpu())
        shape = (*windows.shape, self.k)
        path = self.folder / f"part-{len(self.files):05d}.safetensors"
        save_file({"input_ids": windows.contiguous(), "top_logprobs": torch.cat(logprobs).view(shape).contiguous(),
                   "top_ids": torch.cat(ids).view(shape).contiguous()}, str(path))
        self.files.append(path)
        self.sizes.append(windows.shape[0])

    def __len__(self) -> int:
        return sum(self.sizes)

    @property
    def bytes(self) -> int:
        return sum(path.stat().st_size for path in self.files)

    def get(self, indices: list[int]):
        """(input ids [n, T], (top log-probs [n, T, k], top ids [n, T, k])) of the cached windows ``indices``."""
        import torch
        from safetensors import safe_open

        starts = [0]
        for size in self.sizes:
            starts.append(starts[-1] + size)
        rows = {"input_ids": [], "top_logprobs": [], "top_ids": []}
        for index in indices:
            part = next(i for i in range(len(self.sizes)) if starts[i] <= index < starts[i + 1])
            with safe_open(str(self.files[part]), framework="pt") as handle:
                for name in rows:
                    rows[name].append(handle.get_slice(name)[index - starts[part] : index - starts[part] + 1])
        ids, logprobs, top_ids = (torch.cat(rows[name]) for name in ("input_ids", "top_logprobs", "top_ids"))
        return ids, (logprobs, top_ids)

    def all(self):
        return self.get(list(range(len(self))))


def cached_batches(cache: TopKCache, batch_size: int, seed: int, shuffle: bool) -> Iterator:
    """Batches of the cache's windows: seeded epochs in a new order each (``shuffle``) or in order, forever."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(cache), generator=generator) if shuffle else torch.arange(len(cache))
        if len(order) < batch_size:  # fewer windows than a batch: repeat them
            order = order.repeat(math.ceil(batch_size / len(order)))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield cache.get(order[start : start + batch_size].tolist())
