"""Route peft's LoRA layers through the fused LoRA kernels (tuneforge.kernels.lora)."""

from __future__ import annotations

import logging

from tuneforge.models.families import FamilySpec
from tuneforge.models.patch import kernels_enabled

logger = logging.getLogger(__name__)


def patch_lora(peft_model, spec: FamilySpec | None, enabled: bool | None = None) -> list[str]:
    """Patch the LoRA-wrapped projections of `peft_model`; returns the names of patches applied."""
    if not kernels_enabled(enabled) or spec is None or not spec.kernels:
        logger.info("fused LoRA off for this model: peft's own LoRA forward")
        return []
    raise NotImplementedError(f"fused LoRA for family {spec.name} is declared but not wired")
