"""Llama 2 / 3 / 3.1 / 3.2 / 3.3 and the SmolLM2 family (Llama architecture)."""

from tuneforge.models.families import FamilySpec, register


def _config_class():
    from transformers import LlamaConfig

    return LlamaConfig


LLAMA = register(
    FamilySpec(
        name="llama",
        model_types=("llama",),
        config_class=_config_class,
        chat_template="llama-3.1",
        norm="rms",
        activation="silu",
    )
)
