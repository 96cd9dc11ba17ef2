"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention, a mixture-of-experts block per layer.

Each decoder layer routes every token to `num_experts_per_tok` of `num_experts` gated experts
(softmax over all experts, top-k, renormalised when `norm_topk_prob`). transformers 5 stores the
experts as two stacked 3-D parameters, `gate_up_proj` [experts, 2 * moe_intermediate, hidden] and
`down_proj` [experts, hidden, moe_intermediate]; `experts` names them for NF4 storage and LoRA.
"""

from tuneforge.models.families import FamilySpec, register

QWEN3_MOE = register(
    FamilySpec(
        name="qwen3_moe",
        model_types=("qwen3_moe",),
        config_class="Qwen3MoeConfig",
        chat_template="qwen-3",
        qk_norm="head",
        mlp=None,  # the MoE block: kernels.moe, not the gated-MLP kernels
        activation=None,
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
        experts=("gate_up_proj", "down_proj"),
        gguf_arch="qwen3moe",
        # 4 experts, top 2, renormalised like Qwen3-30B-A3B; every layer sparse. Each expert's
        # weight holds a multiple of 64 values (NF4 blocks never straddle two experts).
        tiny_config_overrides={"head_dim": 16, "moe_intermediate_size": 48, "num_experts": 4,
                               "num_experts_per_tok": 2, "norm_topk_prob": True, "decoder_sparse_step": 1},
    )
)
