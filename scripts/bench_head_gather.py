"""GPU time of the ways to gather key heads per value head into a head-major block, as the pruned mixers do.

    python scripts/bench_head_gather.py [--out results.json]

q [B, T, H_k, d] (a projection's output, token-major) -> [B, H_v, T, d] head-major, value head j reading key head
``index[j]`` (an uneven index, as after pruning), bf16, B = 16, T = 2048, H_k = 8, d = 128, H_v = 14; and the
head-major copy of the same q without a gather; and queries and keys of one fused projection [B, T, 2·H_k·d]
gathered into [2, B, H_v, T, d] (the transformers mixers' ``queries_and_keys``); ``head_gather_kernel`` and
``pair_head_gather_kernel`` are the shipped kernel (``compressor/modeling/head_gather.py``). Each: the median of 50
calls timed with CUDA events.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.modeling.head_gather import gather_heads  # noqa: E402


def gpu_ms(fn, repeat: int = 50) -> float:
    """Median GPU milliseconds of ``fn`` (after 3 untimed calls), CUDA events around each call."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    batch, length, key_heads, dim = 16, 2048, 8, 128
    index = torch.tensor([0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 7, 7], device="cuda")
    q = torch.randn(batch, length, key_heads * dim, device="cuda", dtype=torch.bfloat16)
    heads = q.view(batch, length, key_heads, dim).transpose(1, 2)  # [B, H_k, T, d], a view
    out = q.new_empty(batch, len(index), length, dim)
    expected = heads[:, index].contiguous()
    # slab (b, j) <- slab (b, index[j]) of the head-major copy; row (b, j, t) <- row (b, t, index[j]) of q
    slabs = (torch.arange(batch, device="cuda")[:, None] * key_heads + index).reshape(-1)
    rows = ((torch.arange(batch, device="cuda")[:, None, None] * length
             + torch.arange(length, device="cuda")[None, None, :]) * key_heads + index[None, :, None]).reshape(-1)
    ways = {
        "index_select_out": lambda: torch.index_select(heads, 1, index, out=out),
        "index_tensor_out": lambda: torch.ops.aten.index.Tensor_out(heads, [None, index], out=out),
        "advanced_indexing_then_copy": lambda: out.copy_(heads[:, index]),
        "token_major_index_select_then_copy": lambda: out.copy_(
            q.view(batch, length, key_heads, dim).index_select(2, index).transpose(1, 2)),
        "head_major_copy_then_rows_index_select": lambda: torch.index_select(
            heads.contiguous().view(batch * key_heads, length * dim), 0, slabs, out=out.view(-1, length * dim)),
        "head_major_copy_then_dim1_index_select": lambda: torch.index_select(
            heads.contiguous().view(batch, key_heads, length * dim), 1, index,
            out=out.view(batch, -1, length * dim)),
        "token_rows_index_select": lambda: torch.index_select(
            q.view(-1, dim), 0, rows, out=out.view(-1, dim)),
        "head_gather_kernel": lambda: gather_heads([heads], index, out=out[None]),
    }
    pair = torch.randn(batch, length, 2 * key_heads * dim, device="cuda", dtype=torch.bfloat16)  # queries, keys
    pair_heads = pair.view(batch, length, 2, key_heads, dim).permute(2, 0, 3, 1, 4)  # [2, B, H_k, T, d]
    pair_out = pair.new_empty(2, batch, len(index), length, dim)
    pair_expected = pair_heads[:, :, index].contiguous()
    pair_slabs = (torch.arange(2 * batch, device="cuda")[:, None] * key_heads + index).reshape(-1)
    pair_rows = ((torch.arange(2, device="cuda")[:, None, None, None] * key_heads
                  + torch.arange(batch, device="cuda")[None, :, None, None] * length * 2 * key_heads
                  + torch.arange(length, device="cuda")[None, None, None, :] * 2 * key_heads)
                 + index[None, None, :, None]).reshape(-1)
    pair_ways = {
        "pair_index_select": lambda: torch.index_select(pair_heads, 2, index, out=pair_out),
        "pair_index_tensor_out": lambda: torch.ops.aten.index.Tensor_out(pair_heads, [None, None, index],
                                                                         out=pair_out),
        "pair_head_major_copy_then_slabs": lambda: torch.index_select(
            pair_heads.contiguous().view(-1, length * dim), 0, pair_slabs, out=pair_out.view(-1, length * dim)),
        "pair_head_major_copy_then_dim1": lambda: torch.index_select(
            pair_heads.contiguous().view(2 * batch, key_heads, length * dim), 1, index,
            out=pair_out.view(2 * batch, -1, length * dim)),
        "pair_token_rows_index_select": lambda: torch.index_select(
            pair.view(-1, dim), 0, pair_rows, out=pair_out.view(-1, dim)),
        "pair_head_gather_kernel": lambda: gather_heads(pair_heads.unbind(0), index, out=pair_out),
    }
    figures = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "shape": dict(batch=batch, length=length, key_heads=key_heads, dim=dim, value_heads=len(index))}
    for name, fn in ways.items():
        out.zero_()
        fn()
        figures[name] = {"ms": round(gpu_ms(fn), 4), "exact": bool(torch.equal(out, expected))}
        print(name, figures[name], flush=True)
    for name, fn in pair_ways.items():
        pair_out.zero_()
        fn()
        figures[name] = {"ms": round(gpu_ms(fn), 4), "exact": bool(torch.equal(pair_out, pair_expected))}
        print(name, figures[name], flush=True)
    plain = q.new_empty(batch, key_heads, length, dim)
    figures["head_major_copy_without_gather"] = {"ms": round(gpu_ms(lambda: plain.copy_(heads)), 4)}
    print("head_major_copy_without_gather", figures["head_major_copy_without_gather"])
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
