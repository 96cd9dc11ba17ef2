"""Mixtral (8x7B, 8x22B): Mistral's attention, 8 gated SwiGLU experts per layer, top 2 per token.

The router's softmax runs in fp32 and its top-2 weights are renormalised and stay fp32 (the
expert outputs are weighted in fp32, then cast). Experts are stacked 3-D parameters as for
Qwen3-MoE: `gate_up_proj` [experts, 2 * intermediate, hidden], `down_proj` [experts, hidden, intermediate].
"""

from tuneforge.models.families import FamilySpec, register

MIXTRAL = register(
    FamilySpec(
        name="mixtral",
        model_types=("mixtral",),
        config_class="MixtralConfig",
        chat_template="mistral-v1",
        mlp=None,  # the MoE block: kernels.moe
        activation=None,
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
        experts=("gate_up_proj", "down_proj"),
        gguf_arch="llama",
        tiny_config_overrides={"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 16},
    )
)
