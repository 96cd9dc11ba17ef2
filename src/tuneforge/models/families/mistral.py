"""Mistral dense models (7B v0.1-v0.3, Nemo, Small): Llama's layout plus an optional sliding window."""

from tuneforge.models.families import FamilySpec, register

MISTRAL = register(
    FamilySpec(
        name="mistral",
        model_types=("mistral",),
        config_class="MistralConfig",
        gguf_arch="llama",
        chat_template="mistral-v3",
        # v0.1 used a 4096-token sliding window; a window shorter than the test sequence makes
        # the tiny model exercise the sliding-window mask through the patched attention.
        tiny_config_overrides={"sliding_window": 16},
    )
)
