"""The PyTorch KDA recurrences: chunked against token-by-token, against fla's and transformers' own PyTorch
references, chunk states at every boundary, and CPU tensors kept away from Triton."""

from __future__ import annotations

import inspect

import pytest
import torch

import compressor.modeling.kda as kda
from compressor.modeling.kda import chunk_kda_torch, kimi_delta_attention, naive_recurrent_kda
from compressor.state_capture import kda_with_states


@pytest.fixture
def inputs():
    """q, k [2, 150, 3, 16], v [2, 150, 3, 8], per-channel log decays g [2, 150, 3, 16] spread over
    [-2, 0] (some channels forget within a few tokens, others barely), beta [2, 150, 3]."""
    generator = torch.Generator().manual_seed(0)
    batch, length, heads, key_dim, value_dim = 2, 150, 3, 16, 8
    q = torch.randn(batch, length, heads, key_dim, generator=generator)
    k = torch.randn(batch, length, heads, key_dim, generator=generator)
    v = torch.randn(batch, length, heads, value_dim, generator=generator)
    g = -2.0 * torch.rand(batch, length, heads, key_dim, generator=generator) ** 3
    beta = torch.rand(batch, length, heads, generator=generator)
    return q, k, v, g, beta


def naive_states(q, k, v, g, beta):
    """States after every token, by the textbook update in float64 on L2-normalised q/k: [B, H, T, K, V]."""
    k = torch.nn.functional.normalize(k.double(), dim=-1, eps=1e-6)
    batch, length, heads, key_dim = k.shape
    state = torch.zeros(batch, heads, key_dim, v.shape[-1], dtype=torch.float64)
    states = []
    for t in range(length):
        decayed = state * g[:, t].double().exp()[..., None]
        error = v[:, t].double() - torch.einsum("bhk,bhkv->bhv", k[:, t], decayed)
        state = decayed + torch.einsum("bhk,bhv->bhkv", k[:, t], beta[:, t].double()[..., None] * error)
        states.append(state)
    return torch.stack(states, dim=2)


def test_chunk_states_equal_the_naive_recurrence_at_every_boundary(inputs):
    _, final, chunk_states = chunk_kda_torch(*inputs, use_qk_l2norm_in_kernel=True, output_final_state=True,
                                             return_chunk_states=True)
    reference = naive_states(*inputs)
    assert chunk_states.shape == (2, 3, 3, 16, 8)
    assert torch.allclose(chunk_states.double(), reference[:, :, [63, 127, 149]], atol=1e-5)
    assert torch.equal(final, chunk_states[:, :, -1])


def test_chunked_and_token_by_token_agree_with_an_initial_state(inputs):
    initial = torch.randn(2, 3, 16, 8, generator=torch.Generator().manual_seed(1))
    out_chunk, final_chunk, _ = chunk_kda_torch(*inputs, initial_state=initial, output_final_state=True,
                                                use_qk_l2norm_in_kernel=True)
    out_step, final_step = naive_recurrent_kda(*inputs, initial_state=initial, output_final_state=True,
                                               use_qk_l2norm_in_kernel=True)
    assert (out_chunk - out_step).abs().max() < 1e-5
    assert (final_chunk - final_step).abs().max() < 1e-5
    per_head = [chunk_kda_torch(*(x[:, :, [h]] for x in inputs), initial_state=initial[:, [h]],
                                use_qk_l2norm_in_kernel=True)[0] for h in range(3)]
    assert (out_chunk - torch.cat(per_head, dim=2)).abs().max() < 1e-6, "heads are independent"


def test_agrees_with_the_references_of_fla_and_transformers(inputs):
    from fla.ops.kda.naive import naive_recurrent_kda as fla_naive
    from transformers.models.kimi_linear import modeling_kimi_linear

    q, k, v, g, beta = inputs
    q, k = (torch.nn.functional.normalize(x, dim=-1) for x in (q, k))  # fla's naive form does not normalise
    ours, ours_final, _ = chunk_kda_torch(q, k, v, g, beta, output_final_state=True)
    fla_out, fla_final = fla_naive(q, k, v, g, beta, output_final_state=True)
    assert (ours - fla_out).abs().max() < 1e-4 and (ours_final - fla_final).abs().max() < 1e-4
    transformers_chunk = inspect.unwrap(modeling_kimi_linear.chunk_kimi_delta_attention)  # its PyTorch path
    hf_out, hf_final = transformers_chunk(q, k, v, g, beta, output_final_state=True, use_qk_l2norm_in_kernel=True)
    ours, ours_final, _ = chunk_kda_torch(q, k, v, g, beta, output_final_state=True, use_qk_l2norm_in_kernel=True)
    assert (ours - hf_out).abs().max() < 1e-4 and (ours_final - hf_final).abs().max() < 1e-4


def test_cpu_tensors_never_reach_fla(inputs, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a CPU tensor reached fla's Triton kernel")

    monkeypatch.setattr(kda, "_fla_chunk", forbidden, raising=False)
    monkeypatch.setattr(kda, "_fla_recurrent", forbidden, raising=False)
    out, final = kimi_delta_attention(*inputs, output_final_state=True)
    states = kda_with_states(*inputs, output_final_state=True)[2]
    assert states.shape == (2, 3, 3, 16, 8)
    step, _ = kimi_delta_attention(*(x[:, :1] for x in inputs), initial_state=final, output_final_state=True)
    assert step.shape == (2, 1, 3, 8)
