"""Falcon (7B / 40B / 180B, Falcon 2 11B): LayerNorm, fused multi-query query_key_value, plain GELU MLP.

Only the norms and the loss are patched: the attention (fused multi-query projections, optional
ALiBi) and the non-gated MLP stay transformers'. Falcon 3 models are Llama-architecture and load
as the llama family.
"""

from tuneforge.models.families import FamilySpec, register

FALCON = register(
    FamilySpec(
        name="falcon",
        model_types=("falcon",),
        config_class="FalconConfig",
        gguf_arch="falcon",
        chat_template="chatml",
        norm="layer",
        attention=None,
        mlp=None,
        activation=None,
        lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
        # Its projections: transformers' bitsandbytes swap skips them unless built as nn.Linear.
        linear_subclasses=("FalconLinear",),
        # FalconModel builds its causal mask without position_ids, so packed samples would
        # attend to each other under SDPA/eager.
        packing=False,
        tiny_config_overrides={
            "ffn_hidden_size": 176,
            "num_kv_heads": 2,
            "new_decoder_architecture": True,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    )
)
