"""The family table: what differs between model families, as data (STYLE.md habit 3).

Every supported family has one `FamilySpec` in one module of this package. Code elsewhere asks
the spec (`spec.norm`, `spec.activation`, ...) instead of branching on family names.
"""

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class FamilySpec:
    """How one model family is built and which fast paths fit it.

    name:            our name for the family ("llama", "gemma2", ...).
    model_types:     `config.model_type` values that belong to it.
    config_class:    zero-argument callable returning the transformers config class (lazy import).
    chat_template:   name of the default chat template in `tuneforge.data.templates`.
    norm:            "rms" (x * w), "rms_offset" (x * (1 + w), Gemma) or "layer" (LayerNorm).
    activation:      MLP gate activation: "silu", "gelu_tanh", "gelu" or None (no gated MLP).
    lora_targets:    the linear layers LoRA targets by default.
    kernels:         True when `models.patch` has kernel-backed forwards proven for this family.
    final_logit_softcap_attr / logit_scale_attr: config attributes read by the fused loss.
    tiny_config_overrides: extra config values for the tiny test model.
    """

    name: str
    model_types: tuple[str, ...]
    config_class: Callable[[], type]
    chat_template: str
    norm: str = "rms"
    activation: str | None = "silu"
    lora_targets: tuple[str, ...] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )
    kernels: bool = False
    final_logit_softcap_attr: str | None = None
    logit_scale_attr: str | None = None
    tiny_config_overrides: dict = field(default_factory=dict)


_FAMILIES: dict[str, FamilySpec] = {}


def register(spec: FamilySpec) -> FamilySpec:
    _FAMILIES[spec.name] = spec
    return spec


def _load_all() -> None:
    # Importing the modules registers their specs; kept in one place so the table is complete.
    from tuneforge.models.families import llama  # noqa: F401


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
