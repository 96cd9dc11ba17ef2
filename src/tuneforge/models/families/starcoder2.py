"""StarCoder2 (3B / 7B / 15B): LayerNorm with bias, biased projections, a plain GELU (tanh) MLP."""

from tuneforge.models.families import FamilySpec, register

STARCODER2 = register(
    FamilySpec(
        name="starcoder2",
        model_types=("starcoder2",),
        config_class="Starcoder2Config",
        gguf_arch="starcoder2",
        chat_template="alpaca",
        norm="layer",
        mlp=None,
        activation=None,
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"),
        tiny_config_overrides={"bos_token_id": 1, "eos_token_id": 2, "sliding_window": 16},
    )
)
