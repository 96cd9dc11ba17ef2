"""Cohere Command-R: LayerNorm without bias, parallel attention and MLP, logits scaled by `logit_scale`.

Its RoPE rotates interleaved pairs (x0, x1), (x2, x3), ... rather than the two halves of the head,
so the rotate-half RoPE kernel does not fit: the attention stays transformers'.
"""

from tuneforge.models.families import FamilySpec, register

COHERE = register(
    FamilySpec(
        name="cohere",
        model_types=("cohere",),
        config_class="CohereConfig",
        gguf_arch="command-r",
        chat_template="cohere",
        norm="layer",
        attention=None,
        logit_scale_attr="logit_scale",
        tiny_config_overrides={"bos_token_id": 1, "eos_token_id": 2},
    )
)
