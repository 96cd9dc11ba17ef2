"""Swap a loaded model's forwards for kernel-backed ones, family by family.

One switch turns every patch off so users can compare and bisect: `use_kernels=False` in
`from_pretrained`, or the environment variable TUNEFORGE_DISABLE_KERNELS=1.
"""

from __future__ import annotations

import logging
import os

from tuneforge.models.families import FamilySpec

logger = logging.getLogger(__name__)

DISABLE_ENV = "TUNEFORGE_DISABLE_KERNELS"


def kernels_enabled(explicit: bool | None = None) -> bool:
    """The caller's choice if given, else on unless TUNEFORGE_DISABLE_KERNELS is set to 1/true."""
    if explicit is not None:
        return explicit
    return os.environ.get(DISABLE_ENV, "").lower() not in ("1", "true", "yes")


def patch_model(model, spec: FamilySpec | None, enabled: bool | None = None) -> list[str]:
    """Patch `model` in place; returns the names of the patches applied (empty: plain path)."""
    model.tuneforge_kernels = []
    if not kernels_enabled(enabled):
        logger.info("kernels off (%s or use_kernels=False): plain transformers path", DISABLE_ENV)
        return []
    if spec is None or not spec.kernels:
        name = spec.name if spec else model.config.model_type
        logger.info("family %s has no proven kernel patches yet: plain transformers path", name)
        return []
    raise NotImplementedError(f"kernel patches for family {spec.name} are declared but not wired")
