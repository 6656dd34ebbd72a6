"""fla's model families: available when fla and triton are installed (fla registers its models only then).

``import fla`` happens here, not in ``loading``: compressor's shipped recurrences already import fla when it is
installed. Without fla (or triton) the fla families are absent and ``require_fla`` says what to install.
"""

from __future__ import annotations

import warnings

from ..errors import CompressorError

FLA_MODEL_TYPES = tuple(
    f"{model_type}{suffix}" for model_type in ("gated_deltanet", "delta_net", "gla", "kda") for suffix in ("", "_per_layer")
)

try:  # fla's model classes register only with triton installed; the fla family modules import them
    with warnings.catch_warnings():  # fla warns on import when Triton has no GPU; CPU tensors never reach Triton
        warnings.filterwarnings("ignore", message="Triton is not supported on current platform")
        import fla  # noqa: F401
        from fla.models import GatedDeltaNetConfig  # noqa: F401

    FLA_IMPORT_ERROR: Exception | None = None
except ImportError as error:  # fla missing, or fla without triton (then its layers do not import)
    FLA_IMPORT_ERROR = error


def require_fla(model_type: str) -> None:
    """Raise a CompressorError when ``model_type`` is an fla model and fla cannot be used here."""
    if model_type in FLA_MODEL_TYPES and FLA_IMPORT_ERROR is not None:
        raise CompressorError(
            f"model type '{model_type}' is a flash-linear-attention model, but fla could not be imported "
            f"({FLA_IMPORT_ERROR}); install it with `pip install flash-linear-attention triton`."
        )


def check_config(config) -> None:
    """Refuse fla configs whose other layers have no PyTorch path (full-attention layers, attention residuals)."""
    if getattr(config, "model_type", None) not in FLA_MODEL_TYPES:
        return
    from ..modeling.fla_layers import check_supported

    try:
        check_supported(config)
    except ValueError as error:
        raise CompressorError(f"cannot prune this model: {error}.") from None
