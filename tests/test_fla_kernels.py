"""The PyTorch paths of fla models: routed norms and convolutions against references, chunked recurrences
against token-by-token ones, and CPU forwards that never launch a Triton kernel."""

from __future__ import annotations

import pytest
import torch
from tiny_fla import tiny_fla_model

from compressor.modeling.fla_layers import TorchRoutedRMSNorm, short_convolution
from compressor.slicing import stock_base



ONE_PER_FAMILY = ["gated_deltanet_gva", "delta_net", "gla_conv_relu", "kda_gva"]


@pytest.mark.parametrize("config_name", ONE_PER_FAMILY)
def test_cpu_forward_never_touches_triton(triton_forbidden, config_name):
    model = tiny_fla_model(config_name)
    ids = torch.randint(3, 96, (1, 80))
    with torch.no_grad():
        model(ids)
        model(ids, labels=ids)  # fla's fused cross-entropy is a Triton kernel too
        model.generate(ids[:, :10], max_new_tokens=2, do_sample=False, pad_token_id=0)
    # fla's own class calls Triton for CPU tensors
    stock = stock_base(type(model))(model.config).eval()
    with pytest.raises(Exception, match="Triton kernel was launched|active drivers"):
        with torch.no_grad():
            stock(ids)


def test_rms_norm_with_residual_matches_fla_reference():
    from fla.modules.norm.layernorm import rms_norm_ref

    norm = TorchRoutedRMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x, residual = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    out, summed = norm(x, residual=residual, prenorm=True)
    reference, reference_sum = rms_norm_ref(x, norm.weight, None, residual=residual, eps=1e-6, prenorm=True)
    assert torch.allclose(out, reference, atol=1e-5) and torch.allclose(summed, reference_sum)


def test_short_convolution_continues_from_its_cache():
    """Convolving a sequence in two pieces (cache in between) equals convolving it whole, and equals a
    zero-padded depthwise Conv1d."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 13, 6, generator=generator)
    weight, bias = torch.randn(6, 4, generator=generator), torch.randn(6, generator=generator)
    whole, cache_whole = short_convolution(x, weight, bias, "silu")
    first, cache = short_convolution(x[:, :9], weight, bias, "silu")
    second, cache = short_convolution(x[:, 9:], weight, bias, "silu", cache)
    assert torch.allclose(torch.cat([first, second], dim=1), whole, atol=1e-6)
    assert torch.equal(cache, cache_whole) and torch.equal(cache, x[:, -4:].transpose(1, 2))
    conv = torch.nn.functional.conv1d(x.transpose(1, 2), weight[:, None], bias, padding=3, groups=6)[..., :13]
    assert torch.allclose(whole, torch.nn.functional.silu(conv).transpose(1, 2), atol=1e-6)


def recurrence_inputs(heads=3, key_dim=16, value_dim=8, length=150, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, length, heads, key_dim, generator=generator)
    k = torch.randn(2, length, heads, key_dim, generator=generator)
    v = torch.randn(2, length, heads, value_dim, generator=generator)
    beta = torch.rand(2, length, heads, generator=generator)
    return q, k, v, beta


def test_delta_rule_chunk_states_equal_the_token_by_token_recurrence():
    """The chunked delta rule's outputs and states at every 64-token boundary equal fla's naive recurrence (and
    ours), with an initial state; l2-normalised keys keep the recurrence stable."""
    from fla.ops.delta_rule.naive import delta_rule_recurrence

    from compressor.modeling.delta_rule import chunk_delta_rule_torch, recurrent_delta_rule_torch

    q, k, v, beta = recurrence_inputs()
    q, k = (torch.nn.functional.normalize(x, dim=-1) for x in (q, k))
    initial = torch.randn(2, 3, 16, 8, generator=torch.Generator().manual_seed(1))
    out, final, states = chunk_delta_rule_torch(q, k, v, beta, initial_state=initial, output_final_state=True,
                                                return_chunk_states=True)
    step_out, step_final = recurrent_delta_rule_torch(q, k, v, beta, initial_state=initial, output_final_state=True)
    assert states.shape == (2, 3, 3, 16, 8)
    assert (out - step_out).abs().max() < 1e-5 and (final - step_final).abs().max() < 1e-5
    for boundary, end in enumerate((64, 128, 150)):
        fla_out, fla_state = delta_rule_recurrence(*(x[:, :end].transpose(1, 2) for x in (q, k, v, beta)),
                                                   initial_state=initial)
        assert (states[:, :, boundary] - fla_state).abs().max() < 1e-4
    assert (out - fla_out.transpose(1, 2)).abs().max() < 1e-4


def test_gla_chunk_states_equal_the_token_by_token_recurrence():
    """The chunked GLA's outputs and states at every 64-token boundary equal fla's naive recurrence (and ours),
    with an initial state and strong, channel-dependent decays."""
    from fla.ops.gla.naive import naive_recurrent_gla

    from compressor.modeling.gla import chunk_gla_torch, recurrent_gla_torch

    q, k, v, _ = recurrence_inputs()
    gk = torch.nn.functional.logsigmoid(torch.randn(q.shape, generator=torch.Generator().manual_seed(2))) / 2
    initial = torch.randn(2, 3, 16, 8, generator=torch.Generator().manual_seed(1))
    out, final, states = chunk_gla_torch(q, k, v, gk, initial_state=initial, output_final_state=True,
                                         return_chunk_states=True)
    step_out, step_final = recurrent_gla_torch(q, k, v, gk, initial_state=initial, output_final_state=True)
    assert states.shape == (2, 3, 3, 16, 8)
    assert (out - step_out).abs().max() < 1e-4 and (final - step_final).abs().max() < 1e-4
    for boundary, end in enumerate((64, 128, 150)):
        fla_out, fla_state = naive_recurrent_gla(q[:, :end], k[:, :end], v[:, :end], gk[:, :end],
                                                 initial_state=initial, output_final_state=True)
        assert (states[:, :, boundary] - fla_state).abs().max() < 1e-4
    assert (out - fla_out).abs().max() < 1e-4


@pytest.mark.parametrize("config_name", ONE_PER_FAMILY)
def test_calibration_states_end_in_the_cached_state(config_name):
    """The chunk states a mixer hands to its sink [B, H_v, N, d_k, d_v] end in the state its cache keeps."""
    from compressor.calibration import states_handed_to
    from compressor.families import family_for
    from compressor.layers import linear_layers

    model = tiny_fla_model(config_name)
    ids = torch.randint(3, 96, (2, 150), generator=torch.Generator().manual_seed(0))
    mixers = linear_layers(model, family_for(model.config))
    captured = {}
    with torch.no_grad():
        with states_handed_to(captured.__setitem__, mixers):
            model.model(input_ids=ids, use_cache=False)
        cache = model(input_ids=ids, use_cache=True).past_key_values
    for index, mixer in mixers.items():
        assert captured[index].shape == (2, mixer.num_v_heads, 3, mixer.head_k_dim, mixer.head_v_dim)
        kept = cache[index]["recurrent_state"]
        if config_name.startswith("kda"):  # value-first, as fla's own KDA layer keeps them (here d_v != d_k)
            assert kept.shape[-2:] == (mixer.head_v_dim, mixer.head_k_dim) != (mixer.head_k_dim, mixer.head_v_dim)
            kept = kept.transpose(-1, -2)
        assert (captured[index][:, :, -1] - kept).abs().max() < 1e-5
