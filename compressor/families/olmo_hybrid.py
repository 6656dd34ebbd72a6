"""OLMo-Hybrid (``olmo_hybrid``): Gated DeltaNet layers with separate q, k, v, g, a, b projections, each laid out
head after head; the short convolution holds [q all | k all | v all]; ``o_norm`` is shared (size d_v)."""

from ..modeling.modeling_olmo_hybrid import PrunedOlmoHybridForCausalLM, PrunedOlmoHybridGatedDeltaNet
from .base import K, ONE, V, Family, Flat, columns, rows


OLMO_HYBRID = Family(
    name="OLMo-Hybrid",
    model_types=("olmo_hybrid",),
    mixer_attr="linear_attn",
    tensors={
        "q_proj.weight": rows(Flat((K,))),
        "k_proj.weight": rows(Flat((K,))),
        "v_proj.weight": rows(Flat((V,))),
        "g_proj.weight": rows(Flat((V,))),
        "a_proj.weight": rows(Flat((ONE,))),
        "b_proj.weight": rows(Flat((ONE,))),
        "conv1d.weight": rows(Flat((K, K, V))),
        "A_log": rows(Flat((ONE,))),
        "dt_bias": rows(Flat((ONE,))),
        "o_proj.weight": columns(Flat((V,))),
    },
    shared=("o_norm.weight",),
    modeling_file="modeling_olmo_hybrid.py",
    model_class=PrunedOlmoHybridForCausalLM,
    mixer_class=PrunedOlmoHybridGatedDeltaNet,
)
