"""Norm modules -> `kernels.rms_norm` (Llama, OLMo 2 and Gemma rounding) or `kernels.layer_norm`.

The family's variant (Gemma's 1 + w offset, where the rounding to the input dtype happens) is bound
into the forward when the model is patched.
"""

from __future__ import annotations

import functools
import logging
import types

import torch
from torch import nn

from tuneforge.models.families import FamilySpec

from tuneforge.kernels.layer_norm import layer_norm
from tuneforge.kernels.rms_norm import rms_norm

logger = logging.getLogger(__name__)


def _norm_kind(module: nn.Module, spec: FamilySpec) -> str | None:
    """"rms" / "layer" when `module` is a norm the kernels compute for this family, else None."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None  # e.g. Cohere's optional per-head q/k LayerNorm with a [heads, head_dim] weight
    name = type(module).__name__
    if spec.norm == "layer":
        if isinstance(module, nn.LayerNorm):
            return "layer" if len(module.normalized_shape) == 1 else None
        # Cohere's LayerNorm: no bias, fp32 inside, rounded once: what the kernel does.
        return "layer" if name.endswith("LayerNorm") and getattr(module, "bias", None) is None else None
    return "rms" if name.endswith("RMSNorm") else None


def _norm_eps(module: nn.Module) -> float:
    eps = getattr(module, "variance_epsilon", None)
    return float(module.eps if eps is None else eps)


def _rms_norm_forward(self, hidden_states, *, offset: float, cast_before: bool):
    """hidden_states: [..., H] -> [..., H]; offset 1 for Gemma's (1 + w), cast_before: Llama's rounding."""
    return rms_norm(hidden_states, self.weight, _norm_eps(self), offset, cast_before)


def _layer_norm_forward(self, hidden_states):
    return layer_norm(hidden_states, self.weight, getattr(self, "bias", None), _norm_eps(self))


def patch_norms(model, spec: FamilySpec) -> str | None:
    count = 0
    for module in model.modules():
        kind = _norm_kind(module, spec)
        if kind == "rms":
            # Llama rounds x_hat to the input dtype before the weight; Gemma and OLMo 2 multiply in fp32.
            forward = functools.partial(_rms_norm_forward, offset=1.0 if spec.norm == "rms_offset" else 0.0,
                                        cast_before=spec.norm == "rms")
            module.forward = types.MethodType(forward, module)
            count += 1
        elif kind == "layer":
            module.forward = types.MethodType(_layer_norm_forward, module)
            count += 1
    if not count:
        logger.info("no %s norm modules found in %s: norms not patched", spec.norm, type(model).__name__)
        return None
    return "layer_norm" if spec.norm == "layer" else "rms_norm"
