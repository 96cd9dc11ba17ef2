"""Gemma 2: Gemma plus sandwich norms, alternating sliding-window layers, attention and final-logit soft-capping."""

from tuneforge.models.families import FamilySpec, register

GEMMA2 = register(
    FamilySpec(
        name="gemma2",
        model_types=("gemma2",),
        config_class="Gemma2Config",
        gguf_arch="gemma2",
        chat_template="gemma",
        norm="rms_offset",
        attn_softcap=True,
        activation="gelu_tanh",
        final_logit_softcap_attr="final_logit_softcapping",
        # transformers refuses SDPA for Gemma 2 (SDPA cannot soft-cap the scores).
        attn_implementation="eager",
        tiny_config_overrides={
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 8,
            # The real caps (50 and 30) never bite on a tiny random model, whose logits are
            # below 1: small caps make the tests see the tanh and its gradient.
            "attn_logit_softcapping": 0.5,
            "final_logit_softcapping": 0.3,
        },
    )
)
