"""Gemma (1): RMSNorm with (1 + weight), GeGLU (tanh) MLP, embeddings scaled by sqrt(hidden), tied lm_head."""

from tuneforge.models.families import FamilySpec, register

GEMMA = register(
    FamilySpec(
        name="gemma",
        model_types=("gemma",),
        config_class="GemmaConfig",
        gguf_arch="gemma",
        chat_template="gemma",
        norm="rms_offset",
        activation="gelu_tanh",
        tiny_config_overrides={"head_dim": 16},
    )
)
