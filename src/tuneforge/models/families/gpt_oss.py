"""gpt-oss (20b, 120b): attention with learned sinks and biases, alternating sliding-window layers,
and a mixture of experts with biases and a clamped SwiGLU.

What differs from the other MoE families, and where it is handled:
- attention: a per-head sink logit joins the softmax, and RoPE rotates halves with half-width
  cos/sin; transformers' own attention runs (attention=None), eager (it has no SDPA path);
- norms: x_hat * w in fp32, cast once ("rms_fp32", as OLMo 2), kept in fp32 by transformers;
- experts: stored transposed (`gate_up_proj` [experts, hidden, 2 * intermediate], `down_proj`
  [experts, intermediate, hidden]) with biases, gate and up interleaved (even / odd columns),
  gate * sigmoid(1.702 * gate) * (up + 1) with both clamped: `kernels.moe` calls the module's own
  `_apply_gate`, so the activation is transformers' code;
- router: softmax over the top-k logits only (with a bias);
- packing: off (transformers' masks ignore restarting position_ids here).
"""

from tuneforge.models.families import FamilySpec, register

GPT_OSS = register(
    FamilySpec(
        name="gpt_oss",
        model_types=("gpt_oss",),
        config_class="GptOssConfig",
        chat_template="gpt-oss",
        norm="rms_fp32",
        attention=None,
        mlp=None,
        activation=None,
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
        experts=("gate_up_proj", "down_proj"),
        gguf_arch="gpt-oss",
        attn_implementation="eager",
        # GptOssModel builds its masks without position_ids, so packed samples see each other
        # (tested in tests/models/test_families.py): no padding-free packing.
        packing=False,
        # layer_types alternate sliding (window 4: shorter than the test rows) and full attention.
        tiny_config_overrides={"head_dim": 16, "intermediate_size": 48, "num_local_experts": 4,
                               "num_experts_per_tok": 2, "sliding_window": 4},
    )
)
