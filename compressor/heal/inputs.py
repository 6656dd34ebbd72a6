"""``compress heal``'s input checks, before any weight loads: the pruned folder is one ``compress prune`` wrote,
the teacher has its architecture and tokenizer, the output can be written."""

from __future__ import annotations

from pathlib import Path

from ..errors import CompressorError
from ..preflight import check_pruned_folder, check_teacher_location
from .settings import HealSettings


def read_pruned_record(pruned_dir: Path):
    """The ``compression.json`` record (``compressor.record.CompressionRecord``) of a folder that ``compress prune``
    wrote; refuse anything else in one sentence."""
    from ..record import CompressionRecord

    check_pruned_folder(pruned_dir)
    return CompressionRecord.read(pruned_dir)


def _text_config(name: str):
    from transformers import AutoConfig, PretrainedConfig

    from ..families.fla_support import require_fla

    try:
        require_fla(PretrainedConfig.get_config_dict(name)[0].get("model_type"))
        return AutoConfig.from_pretrained(name).get_text_config()
    except OSError as error:
        raise CompressorError(f"could not load the config of '{name}' (offline, or not on the Hub): {error}") from None
    except ValueError as error:  # an unknown model type, a malformed config
        raise CompressorError(f"the config of '{name}' cannot be read: {str(error).splitlines()[0]}") from None


def _base_type(model_type: str) -> str:
    return model_type.removesuffix("_per_layer")


def check_teacher(teacher: str, pruned_dir: Path, record) -> None:
    """Refuse a teacher of another architecture or another tokenizer than the pruned model's (configs and
    tokenizers only; no weights load)."""
    from transformers import AutoTokenizer

    check_teacher_location(teacher, pruned_dir)
    student_config = _text_config(str(pruned_dir))
    teacher_config = _text_config(teacher)
    wanted = _base_type(record.family)
    if _base_type(teacher_config.model_type) != wanted:
        raise CompressorError(
            f"teacher {teacher} is a '{teacher_config.model_type}' model but the pruned model was cut from a "
            f"'{wanted}' model; the teacher must have the same architecture (the source it was pruned from)."
        )
    if teacher_config.vocab_size != student_config.vocab_size:
        raise CompressorError(
            f"teacher {teacher} has a vocabulary of {teacher_config.vocab_size} tokens and the pruned model "
            f"{student_config.vocab_size}; distillation needs the same tokenizer."
        )
    try:
        teacher_tokenizer = AutoTokenizer.from_pretrained(teacher)
        student_tokenizer = AutoTokenizer.from_pretrained(str(pruned_dir))
    except (OSError, ValueError) as error:
        raise CompressorError(f"could not load the tokenizers of the teacher and the pruned model: {error}") from None
    if (teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab()
            or teacher_tokenizer.all_special_ids != student_tokenizer.all_special_ids):
        raise CompressorError(
            f"teacher {teacher} has another tokenizer than the pruned model (the vocabularies or special tokens "
            "differ); distillation needs the same tokenizer."
        )


def check_inputs(pruned_dir: Path, teacher: str, out_dir: Path, settings: HealSettings, overwrite: bool):
    """Every input checked before a weight loads; returns the pruned folder's record."""
    from ..calibration_text import check_source
    from ..outputs import check_output

    settings.check()
    record = read_pruned_record(pruned_dir)
    check_output(out_dir, overwrite, [pruned_dir, Path(teacher).expanduser()])
    check_source(settings.calib, settings.text_field)
    check_teacher(teacher, pruned_dir, record)
    return record
