"""Removing query/key channels (with heads) equals masking them, for every family that allows it; the channel
choices; the refusals."""

from __future__ import annotations

import pytest
import torch
import tiny_fla
import tiny_hybrids
import tiny_models
from conftest import FIXTURE, assert_user_error, invoke
from fresh_process import reloaded_logits

from compressor.export import write_model
from compressor.families import family_for
from compressor.key_channels import (channel_gradients, channel_scores, choose_channels, collect_key_activations,
                                     kept_key_dim)
from compressor.layers import PruningPlan, linear_layers
from compressor.selection import channel_masks, masked_channels
from compressor.slicing import slim

TOLERANCE = 2e-4  # float32 rounds differently for different head counts (docs/benchmarks.md, "Exactness")


def build(name: str, seed: int = 0) -> torch.nn.Module:
    if name in tiny_models.CONFIGS:
        return tiny_models.tiny_model(name, seed)
    if name in tiny_hybrids.CONFIGS:
        return tiny_hybrids.tiny_hybrid(name, seed)
    return tiny_fla.tiny_fla_model(name, seed)


def head_plan(name: str) -> dict[int, list[int]]:
    return tiny_fla.plans_for(name)["uneven"] if name in tiny_fla.CONFIGS else tiny_models.PLANS["uneven"]


FAMILIES = [*tiny_models.CONFIGS, "qwen3_5_moe", "olmo_hybrid", *tiny_fla.CONFIGS]


def random_channels(model, kept_dim: int, seed: int = 0) -> dict[int, dict[int, list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    return {index: {key: sorted(torch.randperm(mixer.head_k_dim, generator=generator)[:kept_dim].tolist())
                    for key in range(mixer.num_k_heads)}
            for index, mixer in linear_layers(model, family_for(model.config)).items()}


def channel_masked(model, kept: dict[int, list[int]], channels: dict[int, dict[int, list[int]]]):
    """A copy of ``model`` with the removed heads' output columns zeroed and, while it runs, the removed channels of
    q and k zeroed (``masked_channels``; at the source's d_k, so at the source's query scale)."""
    masked = tiny_models.masked_copy(model, kept)
    masked.channel_masking = masked_channels(masked, family_for(masked.config), channels)  # held: closing it unmasks
    masked.channel_masking.__enter__()
    return masked


def sliced_with_channels(name: str, seed: int = 0):
    """(model sliced to the uneven head plan and 5 of 8 (or 10 of 16) channels, its channel-masked source, ids)."""
    model = build(name, seed)
    kept = head_plan(name)
    dims = {m.head_k_dim for m in linear_layers(model, family_for(model.config)).values()}
    channels = random_channels(model, kept_key_dim(dims.pop(), 0.4), seed)
    ids = torch.randint(3, model.config.vocab_size, (2, 150), generator=torch.Generator().manual_seed(seed))
    masked = channel_masked(model, kept, channels)
    heads_only = tiny_models.masked_copy(model, kept)
    slim(model, family_for(model.config), PruningPlan(kept=kept, channels=channels))
    return model, masked, heads_only, ids


@pytest.mark.parametrize("name", FAMILIES)
def test_removing_channels_with_heads_equals_masking_them(name):
    model, masked, heads_only, ids = sliced_with_channels(name)
    with torch.no_grad():
        pruned = model(ids).logits
        assert (pruned - masked(ids).logits).abs().max().item() <= TOLERANCE
        assert (pruned - heads_only(ids).logits).abs().max().item() > 1e-2, "the channels must matter"
    for mixer in linear_layers(model, family_for(model.config)).values():
        assert mixer.head_k_dim == 5 or mixer.head_k_dim == 10
        assert mixer.query_scale is not None


def large_norm_epsilon(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with an epsilon of 10 in every norm inside its linear-attention mixers (their output norms), which
    then no longer divide out a scale of the heads' outputs."""
    for mixer in linear_layers(model, family_for(model.config)).values():
        for module in mixer.modules():
            for name in ("variance_epsilon", "eps"):
                if isinstance(getattr(module, name, None), float):
                    setattr(module, name, 10.0)
    return model


@pytest.mark.parametrize("name", FAMILIES)
def test_the_sliced_layers_keep_the_source_query_scale(name):
    """With a large epsilon in the mixers' output norms, the norms no longer hide the query scale: the sliced
    model equals the masked one only at the source's scale."""
    model = build(name)
    kept = head_plan(name)
    source_key_dim = next(iter(linear_layers(model, family_for(model.config)).values())).head_k_dim
    channels = random_channels(model, source_key_dim // 2)
    ids = torch.randint(3, model.config.vocab_size, (2, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        masked = large_norm_epsilon(channel_masked(model, kept, channels))(ids).logits
        slim(model, family_for(model.config), PruningPlan(kept=kept, channels=channels))
        large_norm_epsilon(model)
        assert (model(ids).logits - masked).abs().max().item() <= TOLERANCE
        mixers = linear_layers(model, family_for(model.config)).values()
        assert {m.query_scale for m in mixers} == {source_key_dim**-0.5}
        for mixer in mixers:
            mixer.query_scale = None  # the kernels' default for the new d_k
        assert (model(ids).logits - masked).abs().max().item() > 10 * TOLERANCE  # OLMo-Hybrid's: 8e-3


def test_channels_with_a_stock_shaped_head_plan_keep_a_per_layer_config():
    """An even uniform head plan alone writes a stock config; with query/key channels removed too, a stock reader
    would scale queries by the new d_k, so the config stays per-layer and carries the source's query scale."""
    model = tiny_models.tiny_model("qwen3_5")
    kept = tiny_models.PLANS["even-uniform"]
    channels = random_channels(model, 4)
    slim(model, family_for(model.config), PruningPlan(kept=kept, channels=channels))
    config = model.config
    assert config.is_heterogeneous and config.architectures != ["Qwen3_5ForCausalLM"]
    for index in kept:
        assert config.per_layer_config[index].linear_key_head_dim == 4
        assert config.per_layer_config[index].linear_query_scale == 8**-0.5


def test_cached_generation_after_channel_removal():
    model, masked, _, ids = sliced_with_channels("qwen3_next_moe")
    settings = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        ours = model.generate(ids[:, :70], **settings)
        reference = masked.generate(ids[:, :70], **settings)
    assert torch.equal(ours.sequences, reference.sequences)
    for a, b in zip(ours.logits, reference.logits):
        assert (a - b).abs().max().item() <= TOLERANCE


@pytest.mark.slow
def test_channel_pruned_folders_reload_without_compressor(tmp_path):
    ids = torch.randint(3, 96, (2, 100), generator=torch.Generator().manual_seed(5))
    expected = {}
    for name in ("qwen3_5", "qwen3_next_dense", "olmo_hybrid", "gated_deltanet_gva", "delta_net_relu_sum",
                 "gla_conv_relu", "kda_gva"):
        model, _, _, _ = sliced_with_channels(name)
        folder = tmp_path / name
        write_model(model, family_for(model.config), folder)
        with torch.no_grad():
            expected[name] = model(ids).logits
    reloaded = reloaded_logits(sorted(expected), ids, tmp_path, checks="""
        config = model.config
        assert config.is_heterogeneous, name
        """)
    for name, logits in expected.items():
        tolerance = 1e-3 if name.startswith("gla") else TOLERANCE  # as the GLA reload check of test_family_fla
        assert (reloaded[name] - logits).abs().max().item() <= tolerance, name


def test_channel_choices():
    """Every method keeps the asked count of distinct channels in each kept key head; l1 keeps the channels of
    largest projection rows; rrqr reads the activations of the key heads."""
    model = tiny_models.tiny_model("qwen3_5")
    family = family_for(model.config)
    mixer = linear_layers(model, family)[0]
    with torch.no_grad():  # make channel 3 of key head 1 the largest by far, in the query and the key rows
        for row in (1 * 8 + 3, 3 * 8 + 1 * 8 + 3):
            mixer.in_proj_qkv.weight[row] *= 50
    windows = torch.randint(3, 96, (2, 64), generator=torch.Generator().manual_seed(0))
    activations = collect_key_activations(model, family, windows, batch_size=1, max_rows=100)
    assert activations.rows[0][1].shape == (100, 8)
    kept_keys = {0: [0, 1], 2: [0, 1, 2], 3: [2]}
    activations.gradients = channel_gradients(model, family, windows, batch_size=1)
    for method in ("rrqr", "l1", "wanda", "taylor", "random"):
        chosen = choose_channels(model, family, method, 3, kept_keys, activations)
        assert {i: sorted(c) for i, c in chosen.items()} == kept_keys
        assert all(len(set(c)) == 3 and c == sorted(c) for heads in chosen.values() for c in heads.values())
    assert channel_scores(mixer, family, "l1", None)[1].argmax().item() == 3
    assert 3 in choose_channels(model, family, "l1", 1, kept_keys)[0][1]


def test_kept_count_rounds_up():
    assert [kept_key_dim(32, r) for r in (0.25, 0.5, 0.75, 0.99)] == [24, 16, 8, 1]
    assert kept_key_dim(128, 0.3) == 90


def test_refusals(no_model_load):
    for args, words in ((("--key-reduction", "1.5"), ("--key-reduction",)),
                        (("--key-reduction", "0.5", "--layout", "stock"), ("--layout stock",))):
        assert_user_error(invoke("prune", FIXTURE, "--dry-run", *args), *words)


def test_kimi_linear_is_refused_with_the_reason():
    from compressor.errors import CompressorError
    from compressor.key_channels import check_key_reduction

    model = tiny_hybrids.tiny_hybrid("kimi_linear")
    family = family_for(model.config)
    with pytest.raises(CompressorError, match="linear_head_dim"):
        check_key_reduction(family, linear_layers(model, family), 0.5)


def test_a_state_reduction_below_the_channels_alone_is_refused():
    result = invoke("prune", FIXTURE, "--dry-run", "--key-reduction", "0.5", "--key-method", "rrqr",
                    "--state-reduction", "0.4", "--method", "norm", "--samples", "1", "--seq-len", "128")
    assert_user_error(result, "--state-reduction")


def test_a_combined_budget_the_heads_cannot_meet_names_the_channels_share_too():
    result = invoke("prune", FIXTURE, "--dry-run", "--key-reduction", "0.25", "--state-reduction", "0.5",
                    "--min-heads-per-layer", "6")
    message = assert_user_error(result, "lower --min-heads-per-layer, or raise --key-reduction")
    assert "heads must remove 33.3% of the state the channels leave for --state-reduction 0.5 in all" in message


def test_combined_dry_run_reaches_the_state_budget():
    result = invoke("prune", FIXTURE, "--dry-run", "--key-reduction", "0.25", "--key-method", "l1",
                    "--state-reduction", "0.5", "--method", "norm", "--samples", "1", "--seq-len", "128")
    assert result.exit_code == 0, result.output
    assert "32 -> 24" in result.output
    smaller = float(result.output.split("bytes (")[1].split("%")[0])
    assert smaller >= 50.0
    assert "--key-reduction alone" not in result.output  # heads were removed: nothing to explain


def test_channels_chosen_by_auto_are_not_taken_for_channels_alone():
    """At 10 % the fixture's held-out loss favours channels alone: no head goes, and since --state-reduction was
    given and auto chose the split, there is no advice to add it."""
    result = invoke("prune", FIXTURE, "--dry-run", "--key-reduction", "auto", "--state-reduction", "0.1", "--method",
                    "norm", "--key-method", "l1", "--samples", "4", "--seq-len", "128")
    assert result.exit_code == 0, result.output
    assert "chose channels\n" in result.stdout and "0 of 32 value heads removed\n" in result.stdout


def test_channels_alone_say_how_to_remove_heads_too():
    """No head is scored, so --method auto (the default) asks for no held-out windows: one calibration window will do."""
    result = invoke("prune", FIXTURE, "--dry-run", "--key-reduction", "0.5", "--key-method", "l1", "--samples", "1",
                    "--seq-len", "128")
    assert result.exit_code == 0, result.output
    assert "0 of 32 value heads removed (--key-reduction alone removes query/key channels; add --state-reduction" \
        in result.stdout


def test_the_record_and_card_name_the_kept_channels(tmp_path):
    import json

    out = tmp_path / "out"
    result = invoke("prune", FIXTURE, "--out", out, "--key-reduction", "0.25", "--key-method", "l1",
                    "--state-reduction", "0.4", "--method", "norm", "--samples", "1", "--seq-len", "128")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "compression.json").read_text())
    card = (out / "README.md").read_text()
    assert "## Query/key channels per key head" in card
    assert "`--key-reduction 0.25`, chosen by `l1`" in card
    layer, entry = next((i, e) for i, e in record["layers"].items() if e.get("kept_key_channels"))
    key, kept = next(iter(entry["kept_key_channels"].items()))
    assert len(kept) == record["method"]["key_dim_after"]
    assert f"| {layer} | {key} |" in card


def test_key_method_auto_keeps_the_lowest_held_out_loss(tmp_path):
    """Every channel method is measured on the held-out windows with its channels masked; the lowest is kept and the
    record, the printed plan and the card say so; the masking leaves the model as it was."""
    import json

    out = tmp_path / "out"
    result = invoke("prune", FIXTURE, "--out", out, "--key-reduction", "0.5", "--method", "norm",
                    "--state-reduction", "0.6", "--samples", "4", "--seq-len", "128")
    assert result.exit_code == 0, result.output
    method = json.loads((out / "compression.json").read_text())["method"]
    assert method["key_method"] == "auto"
    tried = {c["method"]: c["loss"] for c in method["key_candidates"]}
    assert set(tried) == {"rrqr", "l1", "wanda", "taylor", "random"}
    assert method["key_chosen"] == min(tried, key=tried.get)
    assert f"chose {method['key_chosen']}" in result.output
    assert f"chosen by `{method['key_chosen']}`, the lowest held-out loss of" in (out / "README.md").read_text()


def test_masked_channels_masks_only_inside_the_block():
    model = build("qwen3_5")
    family = family_for(model.config)
    ids = torch.randint(3, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        with masked_channels(model, family, random_channels(model, 4)):
            inside = model(ids).logits
        after = model(ids).logits
    assert (inside - before).abs().max() > 1e-3
    assert torch.equal(before, after)


@pytest.mark.parametrize("name", ["qwen3_next_dense", "gla"])
def test_taylor_scores_are_the_loss_gradients_of_channel_masks(name):
    """``taylor``'s score of a channel is |∂L/∂m| of a mask on it (summed over batches): checked against central
    differences of the loss, for a grouped model and an fla family (masks applied where the heads split);
    the key heads it keeps are those of largest score."""
    model = tiny_models.in_float64(build(name))
    family = family_for(model.config)
    mixers = linear_layers(model, family)
    windows = torch.randint(3, model.config.vocab_size, (2, 70), generator=torch.Generator().manual_seed(1))
    scores = channel_gradients(model, family, windows, batch_size=1)
    layer = next(iter(mixers))
    mixer = mixers[layer]
    assert scores[layer].shape == (mixer.num_k_heads, mixer.head_k_dim)

    def loss_at(key: int, channel: int, value: float, ids: torch.Tensor) -> float:
        masks = {layer: torch.ones(mixer.num_k_heads, mixer.head_k_dim, dtype=torch.float64)}
        masks[layer][key, channel] = value
        with torch.no_grad(), channel_masks(model, family, masks):
            logits = model(ids).logits[:, :-1]
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item()

    for key, channel in ((0, 0), (mixer.num_k_heads - 1, mixer.head_k_dim - 1)):
        numeric = sum(abs(loss_at(key, channel, 1 + 1e-3, w[None]) - loss_at(key, channel, 1 - 1e-3, w[None])) / 2e-3
                      for w in windows)  # a wide step: the gates and stock norms round to float32 in a float64 model
        assert abs(numeric - scores[layer][key, channel].item()) <= 1e-3 * max(1.0, numeric), (key, channel)
    activations = collect_key_activations(model, family, windows, batch_size=1, max_rows=50)
    activations.gradients = scores
    chosen = choose_channels(model, family, "taylor", 2, {i: [0] for i in mixers}, activations)
    assert chosen[layer][0] == sorted(scores[layer][0].argsort(descending=True)[:2].tolist())


def test_key_reduction_auto_writes_the_split_of_lowest_held_out_loss(tmp_path):
    """``--key-reduction auto`` tries heads alone, channels alone and both at the state budget; it writes the one of
    lowest held-out loss, which meets the budget, and the record, the printout and the card list every split."""
    import json

    out = tmp_path / "out"
    result = invoke("prune", FIXTURE, "--out", out, "--key-reduction", "auto", "--method", "norm", "--key-method",
                    "l1", "--samples", "4", "--seq-len", "128")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "compression.json").read_text())
    method = record["method"]
    tried = {c["axes"]: c for c in method["axes_candidates"]}
    assert set(tried) == {"heads", "channels and heads", "channels"}
    assert tried["heads"]["key_reduction"] is None
    assert 0 < tried["channels and heads"]["key_reduction"] < 0.389 / 2 + 1e-9 < tried["channels"]["key_reduction"]
    best = min(tried.values(), key=lambda c: c["loss"])
    assert method["axes_chosen"] == best["axes"] and method["key_reduction"] == best["key_reduction"]
    assert tried["heads"]["heads"] == "norm" and tried["channels"]["heads"] is None
    assert tried["channels"]["key_method"] == tried["channels and heads"]["key_method"] == "l1"
    if best["key_reduction"] is not None:
        assert method["key_dim_after"] == round(32 * (1 - best["key_reduction"]))
    assert record["state_bytes_after"] <= (1 - 0.389) * record["state_bytes_before"]
    assert f"; chose {best['axes']}" in result.output
    assert "`--key-reduction auto` split the state budget" in (out / "README.md").read_text()


def test_key_reduction_auto_refuses_saved_statistics_and_too_few_windows(no_model_load, tmp_path):
    assert_user_error(invoke("prune", FIXTURE, "--out", tmp_path / "o", "--key-reduction", "auto", "--method", "norm",
                             "--stats", tmp_path), "cannot reuse --stats")
    assert_user_error(invoke("prune", FIXTURE, "--out", tmp_path / "o", "--key-reduction", "auto", "--samples", "2"),
                      "--key-reduction auto with --method auto")  # 2 windows: 1 held out, 1 left, none to split
    result = invoke("prune", FIXTURE, "--out", tmp_path / "o", "--key-reduction", "half")
    assert result.exit_code == 2 and "neither a number nor 'auto'" in result.output


def test_key_reduction_auto_measures_the_channel_methods_inputs_once(tmp_path, monkeypatch):
    """Both splits that remove channels choose them from one set of activations and taylor gradients (a memo), and
    ``taylor`` runs end to end through the command line."""
    import json

    import compressor.key_channels

    calls = {"activations": 0, "gradients": 0}
    activations, gradients = compressor.key_channels.collect_key_activations, compressor.key_channels.channel_gradients

    def count(name, function):
        def counted(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return counted

    monkeypatch.setattr(compressor.key_channels, "collect_key_activations", count("activations", activations))
    monkeypatch.setattr(compressor.key_channels, "channel_gradients", count("gradients", gradients))
    result = invoke("prune", FIXTURE, "--out", tmp_path / "out", "--key-reduction", "auto", "--method", "norm",
                    "--key-method", "taylor", "--samples", "4", "--seq-len", "128", "--no-verify")
    assert result.exit_code == 0, result.output
    method = json.loads((tmp_path / "out" / "compression.json").read_text())["method"]
    assert {c["axes"] for c in method["axes_candidates"]} == {"heads", "channels and heads", "channels"}
    assert calls == {"activations": 1, "gradients": 1}


def test_a_key_reduction_word_other_than_auto_is_refused_through_the_api(tmp_path):
    from compressor.errors import CompressorError
    from compressor.settings import PruneSettings

    with pytest.raises(CompressorError, match="takes a share between 0 and 1 or 'auto'"):
        PruneSettings(key_reduction="half").check(tmp_path / "out")
