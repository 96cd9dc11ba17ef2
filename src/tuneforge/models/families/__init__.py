"""The family table: what differs between model families, as data (STYLE.md habit 3).

Every supported family has one `FamilySpec` in one module of this package, and every per-family
fact is a field of it: the layout (`tuneforge.patch` turns it into kernel-backed forwards), the LoRA
targets, the default chat template, the llama.cpp architecture it exports to (what that
architecture needs is `tuneforge.export.gguf_arch`'s table, one row per llama.cpp architecture,
which reads the family's norm from here), and the tiny test model's config (`tuneforge.testing.tiny`).
Code elsewhere asks the spec instead of branching on family names. Per-model facts (Hub names,
4-bit twins, a model's own chat template) are `models.registry`'s table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tuneforge.config import SEVEN_PROJECTIONS

NORMS = ("rms", "rms_fp32", "rms_offset", "layer")
ATTENTIONS = (None, "rope")
QKV_LAYOUTS = ("separate", "fused")
QK_NORMS = (None, "head", "full")
MLPS = (None, "gated", "gated_fused")


@dataclass(frozen=True)
class FamilySpec:
    """How one model family is built and which fast paths fit it.

    name:            our name for the family ("llama", "gemma2", ...).
    model_types:     `config.model_type` values that belong to it.
    config_class:    the transformers config class name ("LlamaConfig"), imported lazily.
    chat_template:   name of the default chat template in `tuneforge.data.templates`.
    norm:            the decoder's norm modules: "rms" (Llama: x_hat cast to the input dtype, then
                     * w), "rms_fp32" (OLMo 2: x_hat * w in fp32, cast once), "rms_offset" (Gemma:
                     x_hat * (1 + w) in fp32) or "layer" (LayerNorm, with or without bias).
    attention:       "rope": the attention is Llama-shaped (projections, optional q/k norm,
                     rotate-half RoPE on a leading slice of the head, cache, attention interface,
                     o_proj), so `tuneforge.patch` can run it with the RoPE kernel and the fused QKV
                     LoRA; None: transformers' own attention is kept (Cohere's interleaved RoPE,
                     Falcon's fused multi-query layout).
    qkv:             "separate" (q_proj, k_proj, v_proj) or "fused" (one qkv_proj: Phi-3).
    qk_norm:         None, "head" (a norm over head_dim on each head: Qwen3, Gemma 3) or "full"
                     (over all heads before the reshape: OLMo 2).
    attn_softcap:    attention scores are soft-capped by `config.attn_logit_softcapping` (Gemma 2).
    mlp:             "gated" (down(act(gate(x)) * up(x))), "gated_fused" (gate and up in one
                     gate_up_proj: Phi-3) or None (a plain two-layer MLP, or a mixture of
                     experts: see `experts`; left to transformers by the gated-MLP patch).
    activation:      the gated MLP's activation as the family usually configures it ("silu",
                     "gelu_tanh"); the patch reads the model's own config value.
    lora_targets:    the linear layers LoRA targets by default.
    kernels:         True when `tuneforge.patch` forwards are proven (tests/patch/test_patch.py)
                     for this family; False keeps the plain transformers path with a log line.
    final_logit_softcap_attr: config attribute of the final-logit soft-cap (Gemma 2), read by the fused loss.
    logit_scale_attr: config attribute that scales the logits: multiplied (Cohere's `logit_scale`),
                     or divided when `logit_scale_divides` (Granite's `logits_scaling`).
    attn_implementation: the attention implementation to load with ("eager" where transformers
                     has no SDPA path: Gemma 2's soft-capped scores).
    tiny_config_overrides: config values for the tiny test model (on top of TINY_DIMENSIONS).
    linear_subclasses: class names of nn.Linear subclasses in the family's modeling code that only
                     re-write the matmul (Falcon's FalconLinear: x @ W.T + b). transformers swaps
                     only modules whose type is exactly nn.Linear for bitsandbytes layers, so a
                     quantised load builds these as nn.Linear (`models.loader`) to get them quantised.
    experts:         names of the stacked 3-D expert parameters of the family's mixture-of-experts
                     blocks (transformers 5's `*Experts` modules, e.g. ("gate_up_proj", "down_proj")):
                     stored as NF4 by a 4-bit load (`models.moe`), LoRA-targeted by default through
                     peft's `target_parameters`, computed by `kernels.moe`. () for dense families.
    packing:         padding-free packing keeps samples apart: transformers builds the mask from
                     restarting position_ids (tested: packed loss equals the samples one by one).
    gguf_arch:       the llama.cpp architecture the family exports to ("llama" for Mistral and Mixtral too,
                     "command-r" for Cohere); what that architecture needs is the exporter's table
                     (`tuneforge.export.gguf_arch`, which must have a row of that name: tested). The
                     exporter takes the family's `norm` from here: "rms_offset" is written as w + 1
                     (llama.cpp applies a norm weight as stored), "layer" as LayerNorms. None: no GGUF export.
    """

    name: str
    model_types: tuple[str, ...]
    config_class: str
    chat_template: str
    norm: str = "rms"
    attention: str | None = "rope"
    qkv: str = "separate"
    qk_norm: str | None = None
    attn_softcap: bool = False
    mlp: str | None = "gated"
    activation: str | None = "silu"
    lora_targets: tuple[str, ...] = tuple(SEVEN_PROJECTIONS)
    kernels: bool = True
    final_logit_softcap_attr: str | None = None
    logit_scale_attr: str | None = None
    logit_scale_divides: bool = False
    attn_implementation: str = "sdpa"
    tiny_config_overrides: dict = field(default_factory=dict)
    linear_subclasses: tuple[str, ...] = ()
    experts: tuple[str, ...] = ()
    packing: bool = True
    gguf_arch: str | None = None

    def __post_init__(self):
        # The table is code, but a typo in it should fail at import, naming the family.
        for attr, allowed in (("norm", NORMS), ("attention", ATTENTIONS), ("qkv", QKV_LAYOUTS),
                              ("qk_norm", QK_NORMS), ("mlp", MLPS)):
            if getattr(self, attr) not in allowed:
                raise ValueError(f"family {self.name}: {attr}={getattr(self, attr)!r}, expected one of {allowed}")
        if self.experts and self.mlp is not None:
            raise ValueError(f"family {self.name}: experts={self.experts!r} with mlp={self.mlp!r}; a mixture of "
                             "experts has no gated MLP for the MLP patch: write mlp=None")
        if not isinstance(self.tiny_config_overrides, dict):
            raise ValueError(f"family {self.name}: tiny_config_overrides must be a dict of config values")

    def new_config(self, **values):
        """An instance of this family's transformers config class built from `values`."""
        import transformers

        return getattr(transformers, self.config_class)(**values)


def head_dim(config) -> int:
    """A transformers config's per-head width: `head_dim` where the config sets it (Gemma, Qwen3:
    not hidden / heads), else hidden_size / num_attention_heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


_FAMILIES: dict[str, FamilySpec] = {}


def register(spec: FamilySpec) -> FamilySpec:
    if spec.name in _FAMILIES and _FAMILIES[spec.name] is not spec:
        raise ValueError(f"family {spec.name!r} is registered twice")
    _FAMILIES[spec.name] = spec
    return spec


def _load_all() -> None:
    # Importing the modules registers their specs; kept in one place so the table is complete.
    from tuneforge.models.families import (  # noqa: F401
        cohere,
        falcon,
        gemma,
        gemma2,
        gemma3,
        gpt_oss,
        granite,
        llama,
        mistral,
        mixtral,
        olmo2,
        phi3,
        qwen2,
        qwen3,
        qwen3_moe,
        stablelm,
        starcoder2,
    )


def all_families() -> dict[str, FamilySpec]:
    _load_all()
    return dict(_FAMILIES)


def get_family(name: str) -> FamilySpec:
    families = all_families()
    if name not in families:
        raise KeyError(f"unknown family {name!r}; known: {', '.join(sorted(families))}")
    return families[name]


def family_for_model_type(model_type: str) -> FamilySpec | None:
    """The spec whose `model_types` contains `model_type`, or None when unsupported."""
    for spec in all_families().values():
        if model_type in spec.model_types:
            return spec
    return None
