"""Llama 2 / 3 / 3.1 / 3.2 / 3.3, and the SmolLM2 and Falcon 3 models (Llama architecture)."""

from tuneforge.models.families import FamilySpec, register

LLAMA = register(
    FamilySpec(
        name="llama",
        model_types=("llama",),
        config_class="LlamaConfig",
        gguf_arch="llama",
        chat_template="llama-3.1",
        norm="rms",
        activation="silu",
    )
)
