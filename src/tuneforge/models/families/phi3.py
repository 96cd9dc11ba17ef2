"""Phi-3, Phi-3.5 and Phi-4 (mini and 14B): Llama-like, with fused qkv_proj and gate_up_proj.

The fused projections change the LoRA targets: peft sees qkv_proj and gate_up_proj, not q/k/v
and gate/up.
"""

from tuneforge.models.families import FamilySpec, register

PHI3 = register(
    FamilySpec(
        name="phi3",
        model_types=("phi3",),
        config_class="Phi3Config",
        gguf_arch="phi3",
        chat_template="phi-3",
        qkv="fused",
        mlp="gated_fused",
        lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
        tiny_config_overrides={
            # Phi3Config's pad/eos default to 32000, outside a tiny vocabulary.
            "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
            # Phi-4-mini rotates 3/4 of each head: test the partial-rotary path.
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
        },
    )
)
