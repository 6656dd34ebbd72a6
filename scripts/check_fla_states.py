"""Compare the chunk-boundary states that calibration reads from fla's chunked kernel on CUDA
(`chunk_gated_delta_rule_fla_states`: float32 inputs, the states' dot products in `states_dot_precision`, tf32x3
on NVIDIA GPUs since Ampere and IEEE elsewhere; the output in Triton's default, TF32) with the strict-float32
PyTorch recurrence, on random inputs: the largest output and state differences (per chunk) and the threshold ranks
of both; and that the states of chosen chunks (``chunk_index``, what calibration asks for) are exactly those
chunks' states.

fla's default float32 path multiplies in TF32, whose noise (about 1e-3 of the state's scale) moves threshold
ranks at ε = 1e-4; tf32x3 and IEEE remove it. Run it in a fresh process: Triton's in-memory cache keeps a compiled
kernel whatever the dot precision of a later call.

    python scripts/check_fla_states.py
"""

import argparse

import torch

from compressor.metrics import state_metrics
from compressor.modeling.gated_delta import chunk_gated_delta_rule_torch
from compressor.state_capture import chunk_gated_delta_rule_fla_states


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    generator = torch.Generator(device="cuda").manual_seed(0)
    batch, length, heads, dim = 2, 256, 4, 32
    q, k, v = (torch.randn(batch, length, heads, dim, device="cuda", generator=generator) for _ in range(3))
    g = -0.1 * torch.rand(batch, length, heads, device="cuda", generator=generator)
    beta = torch.rand(batch, length, heads, device="cuda", generator=generator)
    out_t, final_t, states_t = chunk_gated_delta_rule_torch(
        q, k, v, g, beta, output_final_state=True, use_qk_l2norm_in_kernel=True, return_chunk_states=True
    )
    out_f, final_f, states_f = chunk_gated_delta_rule_fla_states(q, k, v, g, beta, output_final_state=True)
    per_chunk = [round((states_t - states_f)[:, :, i].abs().max().item(), 7) for i in range(states_t.shape[2])]
    rank_t = state_metrics(states_t)["threshold_rank"]
    rank_f = state_metrics(states_f)["threshold_rank"]
    print(f"states {tuple(states_t.shape)}, scale {states_t.abs().max().item():.3g}")
    print(f"output diff {(out_t - out_f).abs().max().item():.3g}, final state diff "
          f"{(final_t - final_f).abs().max().item():.3g}, state diff per chunk {per_chunk}")
    print(f"threshold ranks equal: {torch.equal(rank_t, rank_f)} "
          f"(torch {rank_t[0, 0].tolist()}, fla {rank_f[0, 0].tolist()})")
    chosen = torch.tensor([0, 2, states_f.shape[2] - 1], device="cuda")  # the last chunk's state is the final one
    selected = chunk_gated_delta_rule_fla_states(q, k, v, g, beta, chunk_index=chosen)[2]
    print(f"chunk_index {chosen.tolist()}: states equal the chunks' own: "
          f"{torch.equal(selected, states_f.index_select(2, chosen))}")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("check_fla_states.py compares fla's CUDA kernels: it needs a CUDA GPU.")
    main()
