"""OLMo 2: norms after attention and MLP (not before), RMSNorm over the whole q and k projections."""

from tuneforge.models.families import FamilySpec, register

OLMO2 = register(
    FamilySpec(
        name="olmo2",
        model_types=("olmo2",),
        config_class="Olmo2Config",
        gguf_arch="olmo2",
        chat_template="chatml",
        norm="rms_fp32",
        qk_norm="full",
        tiny_config_overrides={"pad_token_id": 1, "bos_token_id": 1, "eos_token_id": 2},
    )
)
