"""Write the contents of an output folder: weights, config, shipped modeling code, tokenizer files, JSON records
(the folder itself is staged and swapped in by ``compressor.outputs``)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from .errors import CompressorError
from .evaluation import max_logit_difference
from .families import Family
from .outputs import staging_folder
from .record import CompressionRecord, VerifyRecord

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)


def write_model(model: nn.Module, family: Family, folder: Path, max_shard_size: str = "2GB",
                stock: bool = False, weights: Callable[[Path], object] | None = None) -> list[str]:
    """Save weights (sharded safetensors), config and the modeling code that ``config.auto_map`` names; with
    ``stock`` (a stock layout), a stock config without ``auto_map`` and no code. ``weights(folder)``, when given,
    writes the weights instead of ``save_pretrained`` (the streaming export; ``model`` may then be on the meta
    device), and the config and generation config are saved as ``save_pretrained`` saves them.

    ``save_pretrained`` records the model's own class in ``architectures``; a config with one head count in every
    layer (no ``per_layer_config``) names the stock class instead, which engines such as vLLM look up.
    Returns the names of the modeling files written.
    """
    architectures = model.config.architectures
    if stock:
        if model.config.is_heterogeneous or getattr(model.config, family.fields.value_to_key, None) is not None:
            raise CompressorError("internal error: a stock layout was planned but the config is not stock.")
        model.config.__dict__.pop("auto_map", None)
    if weights is None:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
    else:
        weights(folder)
        if model.can_generate() and model.generation_config is not None:
            model.generation_config.save_pretrained(folder)
    if weights is not None or architectures != model.config.architectures:
        model.config.architectures = architectures
        model.config.save_pretrained(folder)
    if stock:
        return []
    shipped = shipped_files(family)
    for path in shipped:
        shutil.copyfile(path, folder / path.name)
    return [path.name for path in shipped]


def shipped_files(family: Family) -> list[Path]:
    """The family's modeling file and every file of ``compressor/modeling`` it imports, directly or not."""
    from transformers.dynamic_module_utils import get_relative_import_files

    modeling = Path(resources.files("compressor.modeling").joinpath(family.modeling_file))
    return [modeling, *sorted({Path(p) for p in get_relative_import_files(str(modeling))})]


def copy_tokenizer_files(source: Path | None, folder: Path, save_tokenizer: Callable[[Path], object] | None) -> None:
    """Copy the tokenizer and generation files of a local source; otherwise let the tokenizer save itself."""
    if source is not None and source.is_dir():
        for name in TOKENIZER_FILES:
            if (source / name).is_file() and not (folder / name).exists():
                shutil.copyfile(source / name, folder / name)
    elif save_tokenizer is not None:
        save_tokenizer(folder)



VERIFY_TOLERANCE = 1e-4


def write_folder(loaded, record: CompressionRecord, stats, choice, out_dir: Path, settings,
                 command: str | None, written: Callable[[Path], None] | None = None) -> None:
    """Write the pruned ``loaded`` model's output folder atomically: weights in the checkpoint's dtype, config,
    shipped code, tokenizer files, the reload check (``settings.verify``), ``written(folder)`` (a last measure of
    the written folder), ``compression.json`` and the card. Layer by layer (``loaded.layer_by_layer``), the reload
    check compares the folder with the source pruned layer by layer as it loads."""
    from .analysis import write_card_figures
    from .card import render_card

    cast_parameters(loaded.model, loaded.save_dtype)
    with staging_folder(out_dir, settings.overwrite, "prune", [loaded.local_path]) as staging:
        write_model(loaded.model, loaded.family, staging, settings.max_shard_size, stock=record.layout == "stock",
                    weights=streamed_weights(loaded, choice.plan, settings) if settings.export == "stream" else None)
        copy_tokenizer_files(loaded.local_path, staging, loaded.tokenizer.save_pretrained)
        if settings.verify and loaded.layer_by_layer is None:
            record.verify = verify_folder(loaded.model, staging, verification_tokens(loaded.model.config))
        elif settings.verify:
            record.verify = verify_written(loaded, staging, choice.plan, settings)
        if written is not None:
            written(staging)
        record.write(staging)
        method = record.method.chosen or record.method.name
        figures = write_card_figures(stats, staging, choice.scores, choice.plan.kept, method)
        card = render_card(record, command=command, figures=figures, repo_id=settings.push_to_hub,
                           text_model_of=loaded.text_model_of)
        (staging / "README.md").write_text(card, encoding="utf-8")


def verify_written(loaded, folder: Path, plan, settings) -> VerifyRecord:
    """The reload check layer by layer: ``folder``'s logits against the source's, pruned as each layer loads."""
    from .layerwise_checks import runner_for, verify_layer_by_layer

    memory = loaded.layer_by_layer.memory
    source = runner_for(loaded.local_path, settings.device, settings.dtype, memory)
    written = runner_for(folder, settings.device, settings.dtype, memory)
    return verify_layer_by_layer(source, written, plan, verification_tokens(source.model.config), VERIFY_TOLERANCE)


def streamed_weights(loaded, plan, settings) -> Callable[[Path], object]:
    """The streaming export's weights writer for ``loaded``'s source folder (``compressor.streaming``)."""
    from .loading import load_structure
    from .streaming import write_weights

    if loaded.local_path is None:
        raise CompressorError("--export stream reads the source's safetensors files and needs a local model folder; "
                              "download the model first or use --export memory.")
    return lambda folder: write_weights(loaded.local_path, load_structure(str(loaded.local_path)), plan, folder,
                                        settings.max_shard_size)


def parameter_dtypes(model: nn.Module, dtype: torch.dtype) -> Callable[[str], torch.dtype]:
    """The dtype a floating-point parameter of ``model`` (by name) has once loaded in ``dtype``: float32 where the
    class keeps it so (``_keep_in_fp32_modules_strict`` in float16 and bfloat16, ``_keep_in_fp32_modules`` in
    float16), else ``dtype``; transformers' own loading plan and pattern matching."""
    from transformers.core_model_loading import build_glob_alternation

    plan = model._get_dtype_plan(dtype)
    if not plan:
        return lambda name: dtype
    pattern, globs, _ = build_glob_alternation(list(plan))

    def dtype_of(name: str) -> torch.dtype:
        match = pattern.search(name)
        return plan[globs[match.lastgroup]] if match else dtype

    return dtype_of


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating-point parameters (not buffers such as rotary frequencies) to ``dtype``, as loading does: those
    the class keeps in float32 (``parameter_dtypes``) to float32, so that a source's float32 values (Kimi Linear's
    ``dt_bias`` and router) are saved unrounded."""
    dtype_of = parameter_dtypes(model, dtype)
    for name, parameter in model.named_parameters():
        if parameter.is_floating_point():
            parameter.data = parameter.data.to(dtype_of(name))
    model.config.dtype = dtype


def verification_tokens(config, shape: tuple[int, int] = (2, 256)) -> torch.Tensor:
    """Seeded random token ids [2, 256]: comparing logits needs no meaningful text."""
    return torch.randint(config.vocab_size, shape, generator=torch.Generator().manual_seed(0))


def verify_folder(model: nn.Module, folder: Path, tokens: torch.Tensor) -> VerifyRecord:
    """Reload ``folder`` through its shipped code and compare its logits with ``model``'s; raise on a mismatch."""
    from transformers import AutoModelForCausalLM

    placed = getattr(model, "hf_device_map", None)  # spread over devices: the reloaded model the same way
    reloaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=model.dtype,
                                                    device_map=placed, use_kernels=False)
    reloaded = (reloaded if placed is not None else reloaded.to(next(model.parameters()).device)).eval()
    difference = max_logit_difference(model, reloaded, tokens)
    if not difference <= VERIFY_TOLERANCE:
        raise CompressorError(f"verification failed: the reloaded model's logits differ by {difference:.3g}.")
    return VerifyRecord(max_abs_logit_diff=difference, passed=True, tokens=int(tokens.numel()))
