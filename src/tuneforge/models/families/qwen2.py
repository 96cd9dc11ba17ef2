"""Qwen2 and Qwen2.5: Llama's layout with biases on q, k and v."""

from tuneforge.models.families import FamilySpec, register

QWEN2 = register(
    FamilySpec(
        name="qwen2",
        model_types=("qwen2",),
        config_class="Qwen2Config",
        gguf_arch="qwen2",
        chat_template="qwen-2.5",
    )
)
