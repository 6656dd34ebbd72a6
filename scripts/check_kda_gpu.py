"""KDA on a GPU: fla's Triton kernels (chunk_kda, fused_recurrent_kda) against the PyTorch recurrence of
``compressor/modeling/kda.py``, and a tiny Kimi Linear model through the shipped class on CUDA (fla) vs CPU (PyTorch),
pruned vs masked on CUDA.

    python scripts/check_kda_gpu.py --out scripts/results/check_kda_gpu_h100.json

Needs a CUDA device and fla (``flash-linear-attention`` + ``fla-core`` wheels). Prints and writes a JSON of every
difference it measured, with the device and package versions.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import compressor  # noqa: E402
from compressor.families import family_for  # noqa: E402
from compressor.modeling.kda import chunk_kda_torch, naive_recurrent_kda  # noqa: E402
from compressor.accounting import versions  # noqa: E402
from compressor.layers import PruningPlan, linear_layers  # noqa: E402
from compressor.slicing import slim  # noqa: E402

compressor.register()  # the shipped classes, which route CPU tensors away from fla


def kda_inputs(batch, length, heads, dim, dtype, seed=0):
    """q, k, v [B, T, H, d]; g = -exp(A_log)·softplus(x + dt_bias) per channel, as Kimi's forget gate; beta."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    def randn(*shape):
        return torch.randn(*shape, generator=generator, device="cuda")
    q, k, v = randn(batch, length, heads, dim), randn(batch, length, heads, dim), randn(batch, length, heads, dim)
    a_log = torch.empty(heads, 1, device="cuda").uniform_(0.0, 2.77, generator=generator)  # log of U(1, 16)
    g = -a_log.exp() * F.softplus(randn(batch, length, heads, dim) - 4.0)
    beta = randn(batch, length, heads).sigmoid()
    return [x.to(dtype) for x in (q, k, v)] + [g.float(), beta.to(dtype)]


def kernel_differences(batch, length, heads, dim, dtype) -> dict:
    from fla.ops.kda import chunk_kda, fused_recurrent_kda

    q, k, v, g, beta = kda_inputs(batch, length, heads, dim, dtype)
    torch.backends.cuda.matmul.allow_tf32 = False
    ref_out, ref_final, _ = chunk_kda_torch(q, k, v, g, beta, output_final_state=True, use_qk_l2norm_in_kernel=True)
    fla_out, fla_final = chunk_kda(q, k, v, g=g, beta=beta, output_final_state=True, use_qk_l2norm_in_kernel=True)
    step_inputs = [x[:, :1] for x in (q, k, v, g, beta)]
    ref_step, ref_step_state = naive_recurrent_kda(*step_inputs, initial_state=ref_final, output_final_state=True,
                                                   use_qk_l2norm_in_kernel=True)
    fla_step, fla_step_state = fused_recurrent_kda(*step_inputs[:3], g=step_inputs[3], beta=step_inputs[4],
                                                   initial_state=ref_final.clone(), output_final_state=True,
                                                   use_qk_l2norm_in_kernel=True)
    def diff(a, b):
        return {"max_abs": (a.float() - b.float()).abs().max().item(), "scale": b.float().abs().max().item()}
    return {
        "shape": [batch, length, heads, dim], "dtype": str(dtype).removeprefix("torch."),
        "chunk_output": diff(fla_out, ref_out), "chunk_final_state": diff(fla_final, ref_final),
        "step_output": diff(fla_step, ref_step), "step_state": diff(fla_step_state, ref_step_state),
    }


def tiny_kimi(seed=0):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "kimi_linear", vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        num_hidden_layers=4, layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=16,
        qk_nope_head_dim=16, v_head_dim=16, num_experts=4, num_experts_per_token=2, num_shared_experts=1,
        num_expert_group=1, topk_group=1, linear_num_heads=6, linear_head_dim=32, pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2 and not name.endswith("A_log"):
                parameter.normal_(0.0, 0.05)
    return model


def model_differences() -> dict:
    model = tiny_kimi()
    ids = torch.randint(3, 512, (2, 300), generator=torch.Generator().manual_seed(0))
    kept = {0: [0, 1, 2, 4], 2: [1, 5], 3: [0, 2, 3, 4, 5]}
    with torch.no_grad():
        cpu = model(ids).logits
        cuda_model = copy.deepcopy(model).cuda()
        cuda = cuda_model(ids.cuda()).logits.cpu()
        masked = copy.deepcopy(cuda_model)
        for index, mixer in linear_layers(masked, family_for(masked.config)).items():
            for head in set(range(mixer.num_v_heads)) - set(kept[index]):
                mixer.out_proj.weight[:, head * mixer.head_v_dim : (head + 1) * mixer.head_v_dim] = 0
        masked_logits = masked(ids.cuda()).logits
        slim(cuda_model, family_for(cuda_model.config), PruningPlan(kept=kept))
        pruned_logits = cuda_model(ids.cuda()).logits
    return {
        "fla_cuda_vs_torch_cpu_logits_max_abs": (cuda - cpu).abs().max().item(),
        "logit_scale": cpu.abs().max().item(),
        "pruned_vs_masked_on_cuda_fla_max_abs": (pruned_logits - masked_logits).abs().max().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this check needs a CUDA device")
    results = {
        "device": torch.cuda.get_device_name(), "versions": versions(),
        "kernels": [kernel_differences(2, 1000, 4, 64, torch.float32),
                    kernel_differences(1, 4096, 8, 128, torch.float32),
                    kernel_differences(1, 4096, 8, 128, torch.bfloat16)],
        "model": model_differences(),
    }
    text = json.dumps(results, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
