"""Swap a loaded model's forwards for kernel-backed ones, family by family.

What is patched follows the family table (`FamilySpec` layout fields), never the family name:

  norm modules      -> `kernels.rms_norm` or `kernels.layer_norm`                   (patch/norms.py)
  self_attn         -> one Llama-shaped attention forward that rotates q and k with `kernels.rope`;
                       padding-free batches by `kernels.varlen_attention`          (patch/attention.py)
  mlp               -> act(gate) * up by `kernels.swiglu` / `kernels.geglu`       (patch/mlp.py)
  CausalLM.forward  -> with labels, the chunked loss by `kernels.cross_entropy`     (patch/loss.py)
  bnb Linear4bit    -> decode steps (<= 8 rows, no gradient) by `kernels.nf4_gemv`, the packed weight
                       read once; anything else bitsandbytes' own forward.

Each patched forward gets its plan (AttentionPlan, MlpPlan, LossPlan) bound in when it is patched,
kept in `model.tuneforge.plans` by module name; `lora.fused.patch_lora` rebinds the attention and MLP
plans with its fused LoRA Functions. Nothing asks at run time which path to take.

Every patch is an attribute on the module INSTANCE (`module.forward = ...`), never on a class or
a modeling module's global: a model built later in the same process, or the unpatched twin a test
compares against, runs transformers' code untouched.

One switch turns every patch off so users can compare and bisect: `use_kernels=False` in
`from_pretrained`, or the environment variable TUNEFORGE_DISABLE_KERNELS=1.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import types

from tuneforge.models.families import FamilySpec
from tuneforge.models.record import record_of
from tuneforge.patch.attention import patch_attention, patch_varlen
from tuneforge.patch.loss import patch_loss
from tuneforge.patch.mlp import patch_mlp
from tuneforge.patch.norms import patch_norms
from tuneforge.switches import KERNELS_ENV, TRITON_INTERPRETER

logger = logging.getLogger(__name__)


def kernels_can_run(model) -> str | None:
    """None when Triton kernels can run on `model`'s device, else the reason they cannot."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return "the model has no parameters"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and TRITON_INTERPRETER:
        return None
    return f"Triton kernels need a CUDA device (the model is on {device}; on CPU set TRITON_INTERPRET=1 before importing triton)"


def patch_model(model, spec: FamilySpec | None = None, enabled: bool | None = None) -> list[str]:
    """Patch `model` in place; returns the names of the patches applied (empty: plain path).

    spec / enabled: the family and kernel switch of `model.tuneforge` (the loader's record) unless
    given. The names are also stored in `model.tuneforge.kernels` ("rms_norm" / "layer_norm", "rope",
    "varlen", "swiglu" / "geglu", "fused_cross_entropy", "nf4_gemv"); the trainer reads
    "fused_cross_entropy" and "varlen" there.
    """
    record = record_of(model)
    if spec is None:
        spec = record.family
    else:
        record.family = spec
    if enabled is not None and enabled != record.switches.kernels:
        record.switches = dataclasses.replace(record.switches, kernels=enabled)
    record.kernels = []
    record.plans = {}
    if not record.switches.kernels:
        logger.info("kernels off (%s or use_kernels=False): plain transformers path", KERNELS_ENV)
        return []
    if spec is None or not spec.kernels:
        name = spec.name if spec else model.config.model_type
        logger.info("family %s has no proven kernel patches yet: plain transformers path", name)
        return []
    why_not = kernels_can_run(model)
    if why_not:
        logger.info("kernels off: %s; plain transformers path", why_not)
        return []
    applied: list[str] = []
    for patcher in (patch_norms, patch_attention, patch_varlen, patch_mlp, patch_loss, _patch_linear4bit):
        name = patcher(model, spec)
        if name:
            applied.append(name)
    record.kernels = applied
    logger.info("kernels for family %s: %s", spec.name, ", ".join(applied) or "none fit this model")
    return applied


def _patch_linear4bit(model, spec: FamilySpec) -> str | None:
    """Every bitsandbytes Linear4bit's forward -> `linear4bit.linear4bit_forward` (decode steps only)."""
    import bitsandbytes as bnb

    from tuneforge.patch.linear4bit import linear4bit_forward

    forward = functools.partial(linear4bit_forward, nf4_gemv_on_cuda=record_of(model).switches.nf4_gemv)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.forward = types.MethodType(forward, layer)
    return "nf4_gemv" if layers else None
