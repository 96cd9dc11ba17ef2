"""mlp -> act(gate) * up by `kernels.swiglu` / `kernels.geglu`.

The layout (separate gate/up/down or Phi-3's packed gate_up_proj) and the activation are an
`MlpPlan` bound into the forward when the model is patched; `lora.fused.patch_lora` rebinds it
with the whole block as one fused LoRA Function.
"""

from __future__ import annotations

import functools
import logging
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.kernels.geglu import geglu
from tuneforge.kernels.swiglu import swiglu
from tuneforge.models.families import FamilySpec
from tuneforge.models.record import record_of
from tuneforge.patch.modules import decoder_modules

logger = logging.getLogger(__name__)

# The gated kernels' activations, and the PyTorch functions they must equal.
_KERNEL_ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


def _activation_of(mlp: nn.Module) -> str | None:
    """The kernel activation that `mlp`'s own activation module computes, or None.

    Probed numerically rather than by class name: transformers renames activation classes
    across versions, and "gelu_new" equals "gelu_pytorch_tanh" under another name.
    """
    act = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)
    if act is None:
        return None
    probe = torch.linspace(-6.0, 6.0, 97)
    with torch.no_grad():
        try:
            got = act(probe)
        except Exception:  # noqa: BLE001 - an activation that cannot run on a probe is not one of ours
            return None
        for name, reference in _KERNEL_ACTIVATIONS.items():
            if torch.allclose(got, reference(probe), rtol=0, atol=1e-6):
                return name
    return None


def gated(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up by the SwiGLU / GeGLU kernels; gate, up: [..., I] -> [..., I]."""
    if activation == "silu":
        return swiglu(gate, up)
    return geglu(gate, up, approximate="tanh" if activation == "gelu_tanh" else "none")


def separate_mlp(mlp: nn.Module, x: torch.Tensor, activation: str) -> torch.Tensor:
    """down(act(gate(x)) * up(x)); x: [..., H] -> [..., H]."""
    return mlp.down_proj(gated(mlp.gate_proj(x), mlp.up_proj(x), activation))


def packed_mlp(mlp: nn.Module, x: torch.Tensor, activation: str) -> torch.Tensor:
    """Phi-3: gate_up_proj(x) = [gate | up]; down(act(gate) * up); x: [..., H] -> [..., H]."""
    gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
    return mlp.down_proj(gated(gate, up, activation))


@dataclass(frozen=True)
class MlpPlan:
    """What one patched MLP computes, fixed when the model is patched.

    compute: (mlp, x [..., H], activation) -> [..., H]; `separate_mlp` / `packed_mlp`, or the fused
        LoRA Function that `lora.fused.patch_lora` puts here.
    activation: "silu" (SwiGLU), "gelu" or "gelu_tanh" (GeGLU).
    """

    compute: Callable
    activation: str


def bind(model, name: str, mlp: nn.Module, plan: MlpPlan) -> None:
    """Make `plan` the forward of `mlp` (the module `name` of `model`), recorded in model.tuneforge.plans."""
    mlp.forward = types.MethodType(functools.partial(_mlp_forward, plan=plan), mlp)
    record_of(model).plans[name] = plan


def _mlp_forward(self, x, *, plan: MlpPlan):
    return plan.compute(self, x, plan.activation)


def patch_mlp(model, spec: FamilySpec) -> str | None:
    if spec.mlp is None:
        return None
    projections = ("gate_proj", "up_proj", "down_proj") if spec.mlp == "gated" else ("gate_up_proj", "down_proj")
    compute = separate_mlp if spec.mlp == "gated" else packed_mlp
    modules = decoder_modules(model, "mlp")
    activations = {_activation_of(mlp) for _, mlp in modules}
    missing = [p for _, mlp in modules for p in projections if not hasattr(mlp, p)]
    if not modules or missing or len(activations) != 1 or None in activations:
        logger.info(
            "MLP not patched: %s", f"missing {missing[0]}" if missing else
            "no mlp modules" if not modules else f"activation is not one the gated kernels compute ({activations})",
        )
        return None
    (activation,) = activations
    for name, mlp in modules:
        bind(model, name, mlp, MlpPlan(compute, activation))
    return "swiglu" if activation == "silu" else "geglu"
