"""StableLM 2 (1.6B, 12B) and StableLM 3B: LayerNorm with bias, RoPE on the first quarter of each head."""

from tuneforge.models.families import FamilySpec, register

STABLELM = register(
    FamilySpec(
        name="stablelm",
        model_types=("stablelm",),
        config_class="StableLmConfig",
        gguf_arch="stablelm",
        chat_template="chatml",
        norm="layer",
        tiny_config_overrides={"use_qkv_bias": True, "bos_token_id": 1, "eos_token_id": 2},
    )
)
