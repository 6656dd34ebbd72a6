"""Compare the chunk-boundary states of fla's kernels (CUDA) with the PyTorch recurrence, on random inputs.

fla's Triton kernels multiply in TF32: their states differ from strict float32 by about 1e-3 of the state's
scale, which is why calibration takes its states from the PyTorch recurrence on every device.

    python scripts/check_fla_states.py
"""

import torch
from fla.modules.norm.l2norm import l2norm_fwd as _fla_l2norm
from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_h as _fla_fwd_h
from fla.ops.common.chunk_o import chunk_fwd_o as _fla_fwd_o
from fla.ops.gated_delta_rule.chunk_fwd import chunk_gated_delta_rule_fwd_intra as _fla_fwd_intra
from fla.ops.utils import chunk_local_cumsum as _fla_cumsum
from fla.ops.utils.constant import RCP_LN2 as _RCP_LN2

from compressor.metrics import state_metrics
from compressor.modeling.gated_delta import chunk_gated_delta_rule_torch


def _chunk_fla_with_states(q, k, v, g, beta, initial_state, chunk_size=64):
    """fla's chunked forward that also returns the states at chunk boundaries (no autograd)."""
    q, k = _fla_l2norm(q.contiguous())[0], _fla_l2norm(k.contiguous())[0]
    g = _fla_cumsum(g, chunk_size=chunk_size, scale=_RCP_LN2)
    w, u, _ = _fla_fwd_intra(k=k, v=v, g=g, beta=beta, chunk_size=chunk_size)
    h, v_new, final_state = _fla_fwd_h(
        k=k, w=w, u=u, g=g, initial_state=initial_state, output_final_state=True, chunk_size=chunk_size
    )
    out = _fla_fwd_o(q=q, k=k, v=v_new, h=h, g=g, scale=q.shape[-1] ** -0.5, chunk_size=chunk_size)
    # h[:, i] is the state *before* chunk i; the state after chunk i is h[:, i + 1], and after the last, final_state.
    chunk_states = torch.cat([h[:, 1:].float(), final_state[:, None].float()], dim=1).transpose(1, 2)
    return out, final_state, chunk_states




def main() -> None:
    generator = torch.Generator(device="cuda").manual_seed(0)
    batch, length, heads, dim = 2, 256, 4, 32
    q = torch.randn(batch, length, heads, dim, device="cuda", generator=generator)
    k = torch.randn(batch, length, heads, dim, device="cuda", generator=generator)
    v = torch.randn(batch, length, heads, dim, device="cuda", generator=generator)
    g = -0.1 * torch.rand(batch, length, heads, device="cuda", generator=generator)
    beta = torch.rand(batch, length, heads, device="cuda", generator=generator)
    for tf32 in (True, False):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        out_t, final_t, states_t = chunk_gated_delta_rule_torch(
            q, k, v, g, beta, output_final_state=True, use_qk_l2norm_in_kernel=True, return_chunk_states=True
        )
        out_f, final_f, states_f = _chunk_fla_with_states(q, k, v, g, beta, None)
        rank_t = state_metrics(states_t)["threshold_rank"]
        rank_f = state_metrics(states_f)["threshold_rank"]
        print(
            f"torch tf32={tf32}: shapes {tuple(states_t.shape)} {tuple(states_f.shape)}; "
            f"out diff {(out_t - out_f).abs().max().item():.3g}; final diff {(final_t - final_f).abs().max().item():.3g}; "
            f"states diff per chunk {[round((states_t - states_f)[:, :, i].abs().max().item(), 5) for i in range(states_t.shape[2])]}; "
            f"state scale {states_t.abs().max().item():.3g}; threshold ranks torch {rank_t[0, 0].tolist()} fla {rank_f[0, 0].tolist()}"
        )


if __name__ == "__main__":
    main()
