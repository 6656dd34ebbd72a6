"""Every supported family on a CUDA GPU at realistic head sizes (d_k = d_v = 128, random weights): the exported
folder, loaded as a user loads it (its shipped code, ``trust_remote_code``), against its source with the removed
heads (and query/key channels) masked, in float32 and bfloat16; cached greedy decoding against one full forward
pass; and prefill and decode speed against the source loaded with its stock class.

    python scripts/check_families_gpu.py --work DIR --out results.json [--families a,b] [--phase check]
        [--variants heads] [--rounds 7] [--pairs 101] [--prefill-batch 4] [--fla-width 1024] [--fla-layers 3]
        [--fla-group 2]

Each family's model has 4 layers (hybrids: linear, full attention, linear, linear; fla: 3 linear), hidden size 1024,
vocabulary 4096, and 4 key heads over 8 value heads of 128 (fla DeltaNet and GLA: 8 and 4 heads of 128, ungrouped).
``--fla-width`` and ``--fla-layers`` make the fla models wider (heads of 128 filling the width) and deeper: small
ones leave their prefill bound by the host's launches, larger ones by the GPU's work. Two folders per family are cut
from it: ``heads`` (an uneven plan, different in every layer, grouped layers getting uneven groups) and ``channels``
(the same heads, and 64 of the 128 query/key channels of every kept key head chosen at random; not for Kimi Linear,
whose channel removal is refused). fla's grouped Gated DeltaNet and KDA and its GLA get a third, ``fla_layout``,
checked only: a plan under which every layer runs its prefill in fla's own layout on a GPU (whole key groups kept;
GLA's every head kept and its query/key channels cut). ``--fla-group`` sets the value heads per key head of fla's
Gated DeltaNet and KDA (1: ungrouped). ``qwen3_next_dense`` and ``kimi_linear_dense`` are the MoE models with every
MLP dense (no expert choice for rounding to flip). In float32 each side is also compared with itself on the CPU (the
shipped PyTorch path), to tell which side a GPU difference comes from (``--no-cpu``: not, which shortens the check),
and a left-padded prompt decodes as it does alone.

Run it once per transformers version to check the versions ``pyproject.toml`` admits (each on ``PYTHONPATH``, the
figures record which one ran).

Phase one checks the families in worker processes side by side (Triton compiles their kernels there), families that
share kernels in one worker (fla Gated DeltaNet apart: its model class compiles much besides the kernels it shares
with the Qwen group, and warms up beside it rather than after it). Phase two measures speed in one process, one
family at a time, the folders of a family (``--variants``: heads, channels or both) in turns (bf16, eager): prefill
of 4 x 2048 tokens (``--prefill-batch`` sets the 4: more make it less bound by the host), in rounds and then in
alternating single calls, and greedy decoding at batch 16 (64 new tokens after 256), then the kernel launches and
GPU time of one prefill. Before the timing, worker processes side by side run each family's workloads once (building
the folders the check phase did not build), so that Triton's compilations land in the cache the timing process
reads. From an empty cache that takes minutes per family; with ``TRITON_CACHE_DIR`` naming the cache of an earlier
run of the same versions on the same kind of GPU (it holds fla's autotuning results too), seconds. Figures are
printed as measured; each worker writes its figures beside ``--out`` (check-N.json, warm_up-N.json, speed.json)
after every family, and ``--out`` gathers them with the versions.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests")]

WORKERS = [  # families that share fla kernels run in one worker, which compiles them once (see the docstring)
    ["qwen3_5", "qwen3_5_moe", "qwen3_next", "olmo_hybrid", "qwen3_next_dense"],
    ["gated_deltanet"],  # fla's own model class compiles its convolution, norms and MLP besides the shared kernels
    ["kimi_linear", "kda", "kimi_linear_dense"],
    ["delta_net"],
    ["gla"],
]
HYBRID_LAYERS = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
HYBRID = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2048, num_hidden_layers=4,
              layer_types=HYBRID_LAYERS, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
              linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=128, linear_value_head_dim=128,
              linear_conv_kernel_dim=4, max_position_embeddings=8192, tie_word_embeddings=False,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=512, shared_expert_intermediate_size=512)
FLA = dict(vocab_size=4096, hidden_ratio=2, fuse_cross_entropy=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FLA_WIDTH, FLA_LAYERS, FLA_GROUP = 1024, 3, 2
"""The fla models' hidden size, layers and grouping (``--fla-width``, ``--fla-layers``, ``--fla-group``). Their heads
are of 128: width / 128 value heads (Gated DeltaNet and KDA over FLA_GROUP times fewer key heads), GLA's width / 256
(its keys and values are half the width), so that a width of 768 gives GLA the 3 heads the uneven plan needs."""
KEPT_CHANNELS = 64
SPEED_VARIANTS = ("heads", "channels")
"""The folders the speed phase times beside the source (``--variants``): each folder of other key widths compiles
and autotunes fla's kernels again."""
PREFILL_BATCH, PREFILL_LENGTH = 4, 2048
"""The prefill timed (``--prefill-batch`` sequences of 2048 tokens); its figures are named ``prefill_BxT_...``."""
PREFILL_ROUNDS = 7
"""Rounds of prefill timing per family (``--rounds``): host-bound prefills vary from round to round."""
PREFILL_PAIRS = 101
"""Turns of the alternating prefill measure (``--pairs``): each model prefills once per turn, in turns, so that a
burst of host noise falls on both sides of a pair, and the median of the pairs' ratios is read."""
BUILT = "built"
"""The file ``build_folders`` leaves in a family's folder once every model folder of it is written."""
PROMPT, NEW_TOKENS, DECODE_BATCH = 256, 64, 16
DEVICE = "cuda"  # --device cpu tries the check phase here
CPU_COMPARISON = True  # --no-cpu: no float32 comparison with the CPU
PADDING = 8


def config(name: str):
    from transformers import AutoConfig

    if name == "qwen3_5":
        return AutoConfig.for_model("qwen3_5_text", **HYBRID)
    if name == "qwen3_5_moe":
        fields = {k: v for k, v in HYBRID.items() if k != "intermediate_size"}
        return AutoConfig.for_model("qwen3_5_moe_text", **fields, **MOE)
    if name == "qwen3_next":
        return AutoConfig.for_model("qwen3_next", **HYBRID, **MOE, decoder_sparse_step=1, mlp_only_layers=[])
    if name == "olmo_hybrid":
        fields = {k: v for k, v in HYBRID.items() if k != "head_dim"}
        return AutoConfig.for_model("olmo_hybrid", **fields, linear_allow_neg_eigval=True)
    if name == "qwen3_next_dense":  # every MLP dense: no expert routing for rounding to flip
        return AutoConfig.for_model("qwen3_next", **HYBRID, mlp_only_layers=list(range(4)))
    if name in ("kimi_linear", "kimi_linear_dense"):
        return AutoConfig.for_model(
            "kimi_linear", vocab_size=4096, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512,
            num_hidden_layers=4, layer_types=HYBRID_LAYERS, num_attention_heads=8, num_key_value_heads=8,
            kv_lora_rank=256, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
            num_experts=8, num_experts_per_token=2, num_shared_experts=1, num_expert_group=1, topk_group=1,
            linear_num_heads=8, linear_head_dim=128, linear_conv_kernel_dim=4,
            first_k_dense_replace=4 if name.endswith("_dense") else 1,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    heads = FLA_WIDTH // 128
    fla = dict(FLA, hidden_size=FLA_WIDTH, num_hidden_layers=FLA_LAYERS)
    if name in ("gated_deltanet", "kda"):
        return AutoConfig.for_model(name, **fla, num_heads=heads // FLA_GROUP, num_v_heads=heads,
                                    head_dim=128, expand_v=1.0)
    if name == "delta_net":
        return AutoConfig.for_model("delta_net", **fla, num_heads=heads, expand_k=1.0, expand_v=1.0, use_gate=True)
    if name == "gla":
        return AutoConfig.for_model("gla", **fla, num_heads=heads // 2, expand_k=0.5, expand_v=0.5)
    raise SystemExit(f"unknown family {name}")


def group_refusal(width: int, group: int) -> str | None:
    """Why ``--fla-group`` cannot group the value heads of fla models of hidden size ``width`` (None: it can)."""
    if group < 1 or (width // 128) % group:
        return f"--fla-group takes a divisor of the {width // 128} value heads, not {group}"
    return None


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def uneven_plan(model) -> dict[int, list[int]]:
    """Kept value heads per linear layer: a different cut in each (first: heads 1 and 2 go, which leaves grouped
    layers uneven groups; second: every head but the second and the last go; third: the last head goes)."""
    from compressor.families import family_for
    from compressor.layers import linear_layers

    kept = {}
    for position, (index, mixer) in enumerate(linear_layers(model, family_for(model.config)).items()):
        heads = list(range(mixer.num_v_heads))
        kept[index] = [[h for h in heads if h not in (1, 2)], [1, heads[-1]], heads[:-1]][position % 3]
    return kept


def fla_layout_plan(model) -> tuple[dict[int, list[int]], dict[int, dict[int, list[int]]]] | None:
    """(kept value heads per layer, kept query/key channels) of a plan under which every layer runs its GPU prefill
    in fla's own layout, for the fla models that have one (None for the others): grouped Gated DeltaNet and KDA keep
    whole key groups (each layer loses one key head and its value heads, another in each layer), GLA keeps every
    head and ``KEPT_CHANNELS`` query/key channels of each."""
    from compressor.families import family_for
    from compressor.layers import linear_layers

    mixers = linear_layers(model, family_for(model.config))
    if model.config.model_type == "gla":
        kept = {index: list(range(mixer.num_v_heads)) for index, mixer in mixers.items()}
        return kept, random_channels(model, kept)
    if model.config.model_type not in ("gated_deltanet", "kda") or FLA_GROUP == 1:
        return None
    kept = {}
    for position, (index, mixer) in enumerate(mixers.items()):
        keys = max(mixer.value_to_key) + 1
        kept[index] = [h for h in range(mixer.num_v_heads) if mixer.value_to_key[h] != position % keys]
    return kept, {}


def random_channels(model, kept: dict[int, list[int]]) -> dict[int, dict[int, list[int]]]:
    """``KEPT_CHANNELS`` random query/key channels of every key head that a kept value head reads."""
    import torch

    from compressor.families import family_for
    from compressor.layers import linear_layers

    generator = torch.Generator().manual_seed(1)
    return {index: {key: sorted(torch.randperm(mixer.head_k_dim, generator=generator)[:KEPT_CHANNELS].tolist())
                    for key in sorted({mixer.value_to_key[h] for h in kept[index]})}
            for index, mixer in linear_layers(model, family_for(model.config)).items()}


def build_folders(name: str, work: Path):
    """The float32 source model (shipped class) and its folders under work/name: source (saved as is), heads,
    channels and, for the fla models that have one, fla_layout (``fla_layout_plan``; written by the export). Returns
    (model, {variant: (kept, channels)})."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from compressor.export import write_model
    from compressor.families import family_for
    from compressor.layers import PruningPlan
    from compressor.slicing import slim

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(name), dtype=torch.float32).eval()
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if parameter.dim() >= 2 and not parameter_name.endswith("A_log"):
                parameter.normal_(0.0, 0.03)
    family = family_for(model.config)
    kept = uneven_plan(model)
    variants = {"heads": (kept, {})}
    if not name.startswith("kimi_linear"):
        variants["channels"] = (kept, random_channels(model, kept))
    fla_layout = fla_layout_plan(model)
    if fla_layout is not None:
        variants["fla_layout"] = fla_layout
    model.save_pretrained(work / name / "source")
    for variant, (heads, channels) in variants.items():
        pruned = copy.deepcopy(model)
        slim(pruned, family, PruningPlan(kept=heads, channels=channels))
        write_model(pruned, family, work / name / variant)
        del pruned
    (work / name / BUILT).touch()
    return model, variants


def check_family(name: str, work: Path) -> dict:
    """Pruned folder against the masked source on CUDA, in float32 and bfloat16, for every variant; cached greedy
    decoding against a full forward pass."""
    import torch
    from tiny_models import masked_copy
    from transformers import AutoModelForCausalLM

    from compressor.families import family_for
    from compressor.selection import masked_channels

    started = time.time()
    model, variants = build_folders(name, work)
    family = family_for(model.config)
    ids = torch.randint(3, 4096, (2, 1000), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    report = {}
    for variant, (kept, channels) in variants.items():
        figures = report.setdefault(variant, {"kept_heads": {str(i): h for i, h in kept.items()},
                                              "key_dim": KEPT_CHANNELS if channels else 128})
        for dtype in (torch.float32, torch.bfloat16):
            pruned = AutoModelForCausalLM.from_pretrained(work / name / variant, dtype=dtype, device_map=DEVICE,
                                                          trust_remote_code=True).eval()
            # the source loaded as the folder is (from_pretrained keeps some parameters and buffers in float32,
            # e.g. rotary frequencies, which casting the model in memory would round)
            unpruned = AutoModelForCausalLM.from_pretrained(work / name / "source", dtype=dtype,
                                                            device_map=DEVICE).eval()
            masked = masked_copy(unpruned, kept)
            with torch.no_grad():
                ours = pruned(ids).logits.float()
                with masked_channels(masked, family, channels):
                    reference = masked(ids).logits.float()
                    generated_masked = masked.generate(ids[:, :PROMPT], max_new_tokens=16, min_new_tokens=16,
                                                       do_sample=False, pad_token_id=0)
                whole = unpruned(ids).logits.float()
                generated = pruned.generate(ids[:, :PROMPT], max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                            pad_token_id=0, output_logits=True, return_dict_in_generate=True)
                full = pruned(generated.sequences).logits.float()[:, PROMPT - 1 : -1]
            steps = torch.stack(generated.logits, dim=1).float()
            per_position = (ours - reference).abs().amax(-1)  # [B, T]
            figures[str(dtype).removeprefix("torch.")] = {
                "positions_differing_over_0.1": int((per_position > 0.1).sum()),
                "positions": per_position.numel(),
                "class": type(pruned).__name__,
                "logit_scale": reference.abs().max().item(),
                "pruned_vs_masked_max_abs_diff": (ours - reference).abs().max().item(),
                "pruned_vs_unpruned_max_abs_diff": (ours - whole).abs().max().item(),
                "cached_decode_vs_full_forward_max_abs_diff": (steps - full).abs().max().item(),
                "greedy_tokens_equal_full_forward_argmax": torch.equal(
                    generated.sequences[:, PROMPT:], full.argmax(-1)),
                "greedy_tokens_equal_masked_source": torch.equal(generated.sequences, generated_masked),
                **near_ties(generated.sequences[:, PROMPT:], full),
            }
            if dtype == torch.float32:
                figures["float32"].update(left_padding(pruned, ids))
            if dtype == torch.float32 and DEVICE != "cpu" and CPU_COMPARISON:  # each side against its CPU path
                figures["float32"].update(against_cpu(work / name / variant, model, kept, channels, family, ids,
                                                      ours, reference))
            log(f"{name} {variant} {dtype}: {json.dumps(figures[str(dtype).removeprefix('torch.')])}")
            del pruned, masked, unpruned
    report["check_seconds"] = round(time.time() - started, 1)
    return report


def left_padding(model, ids) -> dict:
    """Cached greedy decoding of a prompt (``ids[0]``'s first ``PROMPT`` tokens) left-padded by ``PADDING`` tokens in
    a batch with another, against the same prompt alone: whether the new tokens are equal, and the largest
    difference of their logits over the steps up to the first token that differs."""
    import torch

    prompt = ids[:1, :PROMPT]
    padded = torch.cat([torch.zeros_like(ids[:1, :PADDING]), prompt], dim=1)
    batch = torch.cat([padded, ids[1:, : PROMPT + PADDING]])
    mask = torch.ones_like(batch)
    mask[0, :PADDING] = 0
    settings = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0, output_logits=True,
                    return_dict_in_generate=True)
    together = model.generate(batch, attention_mask=mask, **settings)
    alone = model.generate(prompt, **settings)
    new_together, new_alone = together.sequences[0, PROMPT + PADDING :], alone.sequences[0, PROMPT:]
    differing = (new_together != new_alone).nonzero()
    steps = int(differing[0]) + 1 if len(differing) else len(new_alone)
    return {"left_padded_tokens_equal_alone": torch.equal(new_together, new_alone),
            "left_padded_vs_alone_max_abs_diff": max(
                (a[0].float() - b[0].float()).abs().max().item() for a, b in zip(together.logits[:steps],
                                                                                  alone.logits[:steps]))}


def against_cpu(folder, model, kept, channels, family, ids, ours, reference) -> dict:
    """The pruned folder's and the masked source's float32 logits on the GPU against the same models on the CPU
    (the shipped PyTorch path): which side a GPU difference comes from."""
    import torch
    from tiny_models import masked_copy
    from transformers import AutoModelForCausalLM

    from compressor.selection import masked_channels

    pruned = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=True).eval()
    masked = masked_copy(model, kept)
    with torch.no_grad():
        cpu_ours = pruned(ids.cpu()).logits
        with masked_channels(masked, family, channels):
            cpu_reference = masked(ids.cpu()).logits
    return {"pruned_gpu_vs_cpu_max_abs_diff": (ours.cpu() - cpu_ours).abs().max().item(),
            "masked_gpu_vs_cpu_max_abs_diff": (reference.cpu() - cpu_reference).abs().max().item(),
            "pruned_vs_masked_on_cpu_max_abs_diff": (cpu_ours - cpu_reference).abs().max().item()}


def near_ties(tokens, full) -> dict:
    """Where cached greedy decoding [B, S] chose another token than the full pass's logits [B, S, V] rank first:
    how many, and the full pass's largest logit margin between its first choice and the token chosen (random
    weights give nearly flat logits, so bf16 rounding flips near-ties)."""
    chosen = full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    margins = (full.max(-1).values - chosen)[tokens != full.argmax(-1)]
    return {"greedy_steps_differing": int(margins.numel()),
            "largest_margin_where_differing": margins.max().item() if margins.numel() else 0.0}


def stock_runner(folder: Path):
    """The source folder on the GPU (bf16) with its stock class (transformers' or fla's); the shipped class where the
    stock one cannot read the config."""
    import torch
    from bench_inference import Runner

    import compressor
    from compressor.slicing import stock_base

    compressor.register()
    from transformers import AutoConfig, AutoModelForCausalLM

    shipped = AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(folder))]
    stock = stock_base(shipped)
    try:
        model, info = stock.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda", output_loading_info=True,
                                            use_kernels=False)  # as the shipped classes load
        if any(info.values()):
            raise ValueError(f"loading info {info}")
    except Exception as error:  # the stock class reads another config format (Kimi Linear's hub remote code)
        log(f"  stock {stock.__name__} cannot load {folder}: {type(error).__name__}: {str(error)[:200]}")
        model = shipped.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda")
    return Runner(folder, model.eval())


def speed_runners(name: str, work: Path) -> dict:
    """The source (stock class) and each pruned folder of ``name`` on the GPU, by variant; the folders are built
    first where the check phase did not build them."""
    from bench_inference import Runner

    if not (work / name / BUILT).is_file():
        build_folders(name, work)
    runners = {"source": stock_runner(work / name / "source")}
    for variant in SPEED_VARIANTS:
        if (work / name / variant).is_dir():
            runners[variant] = Runner(work / name / variant)
    return runners


def warm_up(name: str, work: Path) -> str:
    """Run the speed workloads of ``name``'s folders once, untimed, so that Triton compiles their kernels into the
    cache the timing process then reads (families side by side, as in the check phase)."""
    import torch

    started = time.time()
    runners = speed_runners(name, work)
    for runner in runners.values():
        runner.prefill(runner.tokens(PREFILL_BATCH, PREFILL_LENGTH))
        runner.generate(runner.tokens(DECODE_BATCH, PROMPT), 4)
    del runners, runner
    torch.cuda.empty_cache()
    done = f"warmed up in {time.time() - started:.0f} s"
    log(f"{name} {done}")
    return done


def measure_speed(name: str, work: Path, decode_rounds: int = 3) -> dict:
    """Prefill ``PREFILL_BATCH`` x 2048 and decode rate at batch 16 of the source (stock class) and each pruned
    folder, measured in turns (order reversed every round): prefill in ``PREFILL_ROUNDS`` rounds of the median of 5
    calls (ratios of the medians of the rounds, of the best rounds, and the median of the ratios within a round:
    host-bound prefills vary from round to round, and a round's two sides run seconds apart), decoding in the first
    ``decode_rounds`` (median); then prefill in ``PREFILL_PAIRS`` turns of one call each (the median of the ratios
    of calls made one after the other, and its quartiles)."""
    import torch
    from bench_inference import in_turns, profiled, seconds_of, timed

    rounds, key = PREFILL_ROUNDS, f"prefill_{PREFILL_BATCH}x{PREFILL_LENGTH}"
    runners = speed_runners(name, work)
    figures = {variant: {"class": type(r.model).__name__} for variant, r in runners.items()}
    prefill = {v: r.tokens(PREFILL_BATCH, PREFILL_LENGTH) for v, r in runners.items()}
    prompts = {v: r.tokens(DECODE_BATCH, PROMPT) for v, r in runners.items()}
    for v, runner in runners.items():  # autotune every shape first (compiled already if warm_up ran)
        runner.prefill(prefill[v])
        runner.generate(prompts[v], 4)
    names = list(runners)
    values = {v: {"prefill": [], "decode": []} for v in names}

    def turn(v: str, runner) -> None:  # a prefill round, and decoding in the first decode_rounds turns
        values[v]["prefill"].append(timed(lambda: runner.prefill(prefill[v]), repeat=5))
        if len(values[v]["decode"]) < decode_rounds:
            one = timed(lambda: runner.generate(prompts[v], 1), repeat=1)
            full = timed(lambda: runner.generate(prompts[v], NEW_TOKENS), repeat=1)
            values[v]["decode"].append(DECODE_BATCH * (NEW_TOKENS - 1) / (full - one))

    in_turns(runners, names, rounds, turn)
    for v in names:
        figures[v][f"{key}_s"] = sorted(values[v]["prefill"])[rounds // 2]
        figures[v][f"{key}_best_s"] = min(values[v]["prefill"])
        figures[v][f"{key}_rounds_s"] = values[v]["prefill"]  # in the order measured: how noisy the host is
        figures[v][f"decode_b{DECODE_BATCH}_tok_s"] = sorted(values[v]["decode"])[len(values[v]["decode"]) // 2]
        figures[v][f"decode_b{DECODE_BATCH}_rounds_tok_s"] = values[v]["decode"]
        figures[v]["decode_graphs"] = graph_counts(runners[v].model)
    alternating = in_turns(runners, names, PREFILL_PAIRS, lambda v, r: seconds_of(lambda: r.prefill(prefill[v])))
    for v in names:
        figures[v][f"{key}_alternating_s"] = sorted(alternating[v])[PREFILL_PAIRS // 2]
    for v, runner in runners.items():
        figures[v][f"{key}_profile"] = profiled(lambda: runner.prefill(prefill[v]))
    for v in names[1:]:
        figures[v]["prefill_time_ratio"] = figures[v][f"{key}_s"] / figures["source"][f"{key}_s"]
        figures[v]["prefill_best_time_ratio"] = (figures[v][f"{key}_best_s"]
                                                 / figures["source"][f"{key}_best_s"])
        paired = sorted(a / b for a, b in zip(values[v]["prefill"], values["source"]["prefill"]))
        figures[v]["prefill_paired_time_ratio"] = paired[rounds // 2]
        ratios = sorted(a / b for a, b in zip(alternating[v], alternating["source"]))
        figures[v]["prefill_alternating_time_ratio"] = ratios[PREFILL_PAIRS // 2]
        figures[v]["prefill_alternating_quartiles"] = [ratios[PREFILL_PAIRS // 4], ratios[3 * PREFILL_PAIRS // 4]]
        figures[v]["decode_time_ratio"] = (figures["source"][f"decode_b{DECODE_BATCH}_tok_s"]
                                           / figures[v][f"decode_b{DECODE_BATCH}_tok_s"])
    log(f"{name} speed: {json.dumps(figures)}")
    del runners
    torch.cuda.empty_cache()
    return figures


def graph_counts(model) -> dict | None:
    """The decode graphs a shipped model's mixers recorded and replayed so far (None: a stock model, which has
    none): whether the decode steps timed came from graphs, or ran eagerly."""
    graphs = [module._decode_graph for module in model.modules() if hasattr(module, "_decode_graph")]
    if not graphs:
        return None
    return {"layers": len(graphs), "captures": sum(g.captures for g in graphs),
            "replays": sum(g.replays for g in graphs), "failed": sum(g.failed for g in graphs)}


def run_worker(names: list[str], work: Path, out: Path, task) -> None:
    """``task(name, work)`` (``check_family``, ``warm_up`` or ``measure_speed``) for ``names`` one after the other in
    this process, writing ``out`` after each."""
    import fla  # noqa: F401  (registers fla's model types with transformers)

    import compressor

    compressor.register()
    results = {}
    for name in names:
        try:
            results[name] = task(name, work)
        except Exception as error:  # report and go on with the next family
            results[name] = f"failed: {type(error).__name__}: {error}"[:2000]
            log(f"{name}: {results[name]}")
        out.write_text(json.dumps(results, indent=2))


def main() -> None:
    global DEVICE, CPU_COMPARISON, SPEED_VARIANTS, PREFILL_ROUNDS, PREFILL_PAIRS, PREFILL_BATCH
    global FLA_WIDTH, FLA_LAYERS, FLA_GROUP
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="a folder for the models (several GB)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--families", default=",".join(f for group in WORKERS for f in group))
    parser.add_argument("--phase", choices=["check", "speed", "both"], default="both")
    parser.add_argument("--device", default="cuda", help="cpu: try the check phase without a GPU")
    parser.add_argument("--no-cpu", action="store_true",
                        help="no float32 comparison with the CPU (a diagnostic; shortens the check)")
    parser.add_argument("--variants", default="heads,channels",
                        help="the folders the speed phase times (heads: shortens the warm-up)")
    parser.add_argument("--rounds", type=int, default=PREFILL_ROUNDS, help="rounds of prefill timing per family")
    parser.add_argument("--pairs", type=int, default=PREFILL_PAIRS,
                        help="turns of the alternating prefill measure per family")
    parser.add_argument("--prefill-batch", type=int, default=PREFILL_BATCH, help="sequences of 2048 tokens prefilled")
    parser.add_argument("--fla-width", type=int, default=FLA_WIDTH,
                        help="hidden size of the fla models (a multiple of 256 from 768: heads of 128)")
    parser.add_argument("--fla-layers", type=int, default=FLA_LAYERS, help="layers of the fla models")
    parser.add_argument("--fla-group", type=int, default=FLA_GROUP,
                        help="value heads per key head of fla's Gated DeltaNet and KDA (1: ungrouped)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--speed-worker", help=argparse.SUPPRESS)
    parser.add_argument("--warm-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    DEVICE, CPU_COMPARISON = args.device, not args.no_cpu
    SPEED_VARIANTS, PREFILL_ROUNDS, PREFILL_PAIRS = tuple(args.variants.split(",")), args.rounds, args.pairs
    PREFILL_BATCH, FLA_WIDTH, FLA_LAYERS = args.prefill_batch, args.fla_width, args.fla_layers
    FLA_GROUP = args.fla_group
    if min(PREFILL_ROUNDS, PREFILL_PAIRS, PREFILL_BATCH, FLA_LAYERS) < 1:
        parser.error("--rounds, --pairs, --prefill-batch and --fla-layers take positive counts")
    if FLA_WIDTH < 768 or FLA_WIDTH % 256:
        parser.error(f"--fla-width takes a multiple of 256 from 768 (heads of 128, at least 3 in every family), not "
                     f"{FLA_WIDTH}")
    if group_refusal(FLA_WIDTH, FLA_GROUP):
        parser.error(group_refusal(FLA_WIDTH, FLA_GROUP))
    if not set(SPEED_VARIANTS) <= {"heads", "channels"}:
        parser.error(f"--variants takes heads and channels, not {args.variants}")
    for names, task in ((args.worker, check_family), (args.warm_worker, warm_up), (args.speed_worker, measure_speed)):
        if names:
            run_worker(names.split(","), args.work, args.out, task)
            return
    from bench_inference import versions

    from compressor.accounting import versions as package_versions

    wanted = args.families.split(",")
    unknown = set(wanted) - {f for group in WORKERS for f in group}
    if unknown:
        parser.error(f"unknown families {sorted(unknown)}")
    if DEVICE != "cuda" and args.phase != "check":
        parser.error("the speed phase needs a GPU; with --device cpu use --phase check")
    if args.work.exists() and any(args.work.iterdir()):
        parser.error(f"--work {args.work} is not empty; name a new folder (the script writes model folders in it)")
    groups = [[f for f in group if f in wanted] for group in WORKERS]
    parts = {f"{key}-{i}": args.out.parent / f"{key}-{i}.json"
             for key in ("check", "warm_up") for i, group in enumerate(groups) if group}
    parts["speed"] = args.out.parent / "speed.json"
    taken = [str(part) for part in [*parts.values(), args.out] if part.exists()]
    if taken:
        parser.error(f"will not overwrite {', '.join(taken)}: the script writes there (move them or choose another "
                     "--out)")
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = {"versions": versions() if DEVICE == "cuda" else package_versions(), "speed_variants": SPEED_VARIANTS,
               "prefill_rounds": PREFILL_ROUNDS, "prefill_pairs": PREFILL_PAIRS, "prefill_batch": PREFILL_BATCH,
               "shape": {"hybrid": HYBRID, "moe": MOE,
                         "fla": dict(FLA, hidden_size=FLA_WIDTH, num_hidden_layers=FLA_LAYERS,
                                     value_heads_per_key_head=FLA_GROUP)},
               "check": {}, "warm_up": {}, "speed": {}}

    def save():
        args.out.write_text(json.dumps(results, indent=2))

    def gather(part: Path, returncode: int) -> dict:
        """A worker's figures, and its exit status where it failed (families it did not reach are missing)."""
        figures = json.loads(part.read_text()) if part.exists() else {}
        if returncode != 0:
            figures[f"worker {part.stem}"] = f"failed: exit status {returncode}"
        return figures

    sizes = ["--fla-width", str(FLA_WIDTH), "--fla-layers", str(FLA_LAYERS), "--fla-group", str(FLA_GROUP)]

    def side_by_side(flag: str, key: str) -> None:
        """One worker process per group of families, all at once; their figures gathered into results[key]."""
        started = time.time()
        workers = [(subprocess.Popen([sys.executable, __file__, flag, ",".join(group), "--work", str(args.work),
                                      "--out", str(parts[f"{key}-{i}"]), "--device", DEVICE, "--variants",
                                      args.variants, "--prefill-batch", str(args.prefill_batch), *sizes,
                                      *["--no-cpu"] * args.no_cpu]), i)
                   for i, group in enumerate(groups) if group]
        for process, i in workers:
            results[key].update(gather(parts[f"{key}-{i}"], process.wait()))
            save()
        results[f"{key}_seconds"] = round(time.time() - started, 1)
        save()

    save()
    if args.phase in ("check", "both"):
        side_by_side("--worker", "check")
    if args.phase in ("speed", "both"):  # compiled side by side, then timed in one process, one family at a time
        side_by_side("--warm-worker", "warm_up")
        process = subprocess.run([sys.executable, __file__, "--speed-worker", ",".join(wanted), "--work",
                                  str(args.work), "--out", str(parts["speed"]), "--variants", args.variants,
                                  "--rounds", str(args.rounds), "--pairs", str(args.pairs),
                                  "--prefill-batch", str(args.prefill_batch), *sizes])
        results["speed"] = gather(parts["speed"], process.returncode)
        save()
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
