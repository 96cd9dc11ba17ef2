"""Qwen3 (dense): no q/k/v biases, an RMSNorm over head_dim on each query and key head."""

from tuneforge.models.families import FamilySpec, register

QWEN3 = register(
    FamilySpec(
        name="qwen3",
        model_types=("qwen3",),
        config_class="Qwen3Config",
        gguf_arch="qwen3",
        chat_template="qwen-3",
        qk_norm="head",
        # Qwen3Config's head_dim defaults to 128, not hidden / heads.
        tiny_config_overrides={"head_dim": 16},
    )
)
