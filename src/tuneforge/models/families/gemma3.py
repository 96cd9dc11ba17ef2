"""Gemma 3 text models (270M, 1B, and the text tower of 4B-27B): Gemma 2 without soft-capping, q/k RMSNorm, per-layer-type RoPE."""

from tuneforge.models.families import FamilySpec, register

GEMMA3 = register(
    FamilySpec(
        name="gemma3",
        model_types=("gemma3_text",),
        config_class="Gemma3TextConfig",
        gguf_arch="gemma3",
        chat_template="gemma",
        norm="rms_offset",
        qk_norm="head",
        activation="gelu_tanh",
        final_logit_softcap_attr="final_logit_softcapping",
        tiny_config_overrides={
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    )
)
