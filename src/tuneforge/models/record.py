"""`model.tuneforge`: the one record of what tuneforge decided for a model.

The loader creates it (family, switches); the patches, LoRA, gradient checkpointing and generation
fill in what they chose. Code that needs to know how a model is set up reads this record; nothing
else is stored on the model. peft's wrappers forward attribute reads to the model they wrap, so
`peft_model.tuneforge` is the base model's record.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tuneforge import switches as switches_module
from tuneforge.integration.peft import base_model
from tuneforge.models.families import FamilySpec
from tuneforge.switches import Switches


@dataclass
class ModelRecord:
    switches: Switches
    family: FamilySpec | None = None
    # patch_model's patches: "rms_norm" / "layer_norm", "rope", "varlen", "swiglu" / "geglu",
    # "fused_cross_entropy", "nf4_gemv" (the trainer reads "fused_cross_entropy" and "varlen").
    kernels: list[str] = field(default_factory=list)
    # patch_lora's: "lora_mlp", "lora_qkv", "lora_linear".
    lora_kernels: list[str] = field(default_factory=list)
    # from_pretrained's use_gradient_checkpointing, applied by get_peft_model (Unsloth takes it in both).
    gradient_checkpointing: object = None
    # for_inference turned checkpointing off; for_training puts it back.
    resume_checkpointing: bool = False
    # module name -> the plan its patched forward was bound with (patch.attention.AttentionPlan,
    # patch.mlp.MlpPlan, patch.loss.LossPlan under ""): what runs, decided at patch time.
    plans: dict[str, object] = field(default_factory=dict)
    # how generate() decodes: "tuneforge (...)" or "transformers (reason)".
    generate_path: str | None = None


def record_of(model) -> ModelRecord:
    """`model.tuneforge`; for a model tuneforge did not load, made now with the switches resolved from
    the environment at this first use."""
    base = base_model(model)
    record = base.__dict__.get("tuneforge")
    if record is None:
        record = ModelRecord(switches=switches_module.resolve())  # resolved once, when first needed
        base.__dict__["tuneforge"] = record
    return record
