"""IBM Granite 3.x (dense): Llama's layout with embedding, residual, attention and logit multipliers."""

from tuneforge.models.families import FamilySpec, register

GRANITE = register(
    FamilySpec(
        name="granite",
        model_types=("granite",),
        config_class="GraniteConfig",
        gguf_arch="granite",
        chat_template="granite",
        logit_scale_attr="logits_scaling",
        logit_scale_divides=True,
        # Granite-3 values, so every multiplier differs from 1 in the tests.
        tiny_config_overrides={
            "embedding_multiplier": 12.0,
            "residual_multiplier": 0.22,
            "attention_multiplier": 0.0625,
            "logits_scaling": 4.0,
        },
    )
)
