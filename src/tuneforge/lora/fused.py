"""Route peft's LoRA layers through the fused LoRA kernels (tuneforge.kernels.lora).

After `peft.get_peft_model`, each targeted projection is a peft `LoraLayer` whose forward runs the
base layer (a bitsandbytes 4-bit matmul, or a dense one) and then the adapter as separate ops.
`patch_lora` replaces, on the module INSTANCES (nothing leaks to other models):

  the MLP block      -> `lora_mlp`: gate, up, act * up and down in one autograd Function
                        (the `MlpPlan` of a block `patch.mlp` runs with separate gate/up/down);
  Q, K, V            -> `lora_qkv`: one Function that saves the input once and sums its gradient
                        (the `AttentionPlan` of an attention with separate q/k/v projections);
  every other LoRA   -> `lora_linear` (O, and Phi-3's qkv_proj / gate_up_proj, StarCoder2's c_fc, ...).

The kernels dequantise NF4 weights on the fly (no dense copy kept between the passes) and never
form the frozen weight's gradient. They compute plain LoRA with one adapter and no dropout; other
set-ups (lora_dropout > 0, several adapters, DoRA, lora_bias) keep peft's own forward, with a log
line saying why.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import types

from torch import nn

from tuneforge.models.families import FamilySpec
from tuneforge.models.record import record_of
from tuneforge.patch import attention, kernels_can_run, mlp
from tuneforge.patch.attention import AttentionPlan, separate_qkv
from tuneforge.patch.mlp import MlpPlan, separate_mlp

logger = logging.getLogger(__name__)


def _lora_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    # peft's ParamWrapper (target_parameters: MoE experts, routers) adapts a parameter, not a Linear's
    # output: its base may hold a `weight` (a router's) without being a Linear. models.moe routes them.
    return [(name, m) for name, m in module.named_modules() if hasattr(m, "lora_A") and hasattr(m, "get_base_layer")
            and type(m).__name__ != "ParamWrapper"]


def unfusable_reason(peft_model) -> str | None:
    """Why peft's adapters cannot go through the fused kernels (None: they can)."""
    configs = getattr(peft_model, "peft_config", {})
    if len(configs) != 1:
        return f"{len(configs)} adapters ({', '.join(configs)}); the fused path takes one"
    (name, config), = configs.items()
    if getattr(config, "lora_dropout", 0.0):
        return f"lora_dropout={config.lora_dropout} (the fused kernels need 0)"
    if getattr(config, "use_dora", False):
        return "DoRA adapters (use_dora=True)"
    if getattr(config, "lora_bias", False):
        return "lora_bias=True"
    if type(config).__name__ != "LoraConfig":
        return f"{type(config).__name__} adapters (only LoRA is fused)"
    return None


_WARNED: set[str] = set()


def _projections(layers):
    """`LoRAProjection`s of `layers`, or None (logged once per module) when one cannot be fused now.

    Checked at every call because peft state changes after patching (set_adapter with several
    adapters, a dropout module put back into training, ...).
    """
    from tuneforge.lora.projections import projection_of

    try:
        return [projection_of(layer) for layer in layers]
    except (NotImplementedError, ValueError) as error:
        if str(error) not in _WARNED:  # once per reason, not once per layer and step
            _WARNED.add(str(error))
            logger.warning("fused LoRA skipped, peft's forward instead: %s", error)
        return None


def fused_qkv(attn: nn.Module, hidden_states, *, grouped: bool, nf4_gemv: bool):
    """(q, k, v) of `attn` by `lora_qkv`; the separate projections (peft's forwards) when the
    adapters cannot be fused now. An `AttentionPlan.project` (grouped bound in by patch_lora)."""
    from tuneforge.lora.projections import lora_qkv

    projections = _projections((attn.q_proj, attn.k_proj, attn.v_proj))
    return separate_qkv(attn, hidden_states) if projections is None else lora_qkv(hidden_states, *projections, grouped=grouped,
                                                                                         nf4_gemv=nf4_gemv)


def fused_mlp(mlp: nn.Module, x, activation: str, *, grouped: bool, nf4_gemv: bool):
    """down(act(gate(x)) * up(x)) of `mlp` by `lora_mlp`; the separate projections (peft's forwards)
    when the adapters cannot be fused now. An `MlpPlan.compute` (grouped bound in by patch_lora)."""
    from tuneforge.lora.projections import lora_mlp

    projections = _projections((mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    return separate_mlp(mlp, x, activation) if projections is None else lora_mlp(x, *projections, activation=activation,
                                                                              grouped=grouped, nf4_gemv=nf4_gemv)


def _fused_linear_forward(self, x, *args, nf4_gemv: bool, **kwargs):
    """A peft LoRA Linear's forward by `lora_linear`; x: [..., in] -> [..., out]."""
    if not args and not kwargs:  # adapter_names=... (mixed-batch inference) is peft's business
        projections = _projections((self,))
        if projections is not None:
            from tuneforge.lora.projections import lora_linear

            out = lora_linear(x, projections[0], nf4_gemv=nf4_gemv)
            # kernels.lora returns a view made inside its autograd Function, which autograd forbids
            # modifying in place; Falcon adds into its MLP output in place. Clone only while the
            # kernel returns such a view (reported; a reshape outside the Function would fix it).
            return out.clone() if out._base is not None else out
    return type(self).forward(self, x, *args, **kwargs)


# Blocks computed by one fused Function: (plan type, how patch binds it, the plan's separate-projection
# function the fused one replaces, the projections the Function reads, the plan field, the fused function, name).
_FUSED_BLOCKS = (
    (MlpPlan, mlp.bind, separate_mlp, ("gate_proj", "up_proj", "down_proj"), "compute", fused_mlp, "lora_mlp"),
    (AttentionPlan, attention.bind, separate_qkv, ("q_proj", "k_proj", "v_proj"), "project", fused_qkv, "lora_qkv"),
)


def patch_lora(peft_model, spec: FamilySpec | None, enabled: bool | None = None) -> list[str]:
    """Patch the LoRA-wrapped projections of `peft_model`; returns the names of patches applied.

    Names: "lora_mlp", "lora_qkv", "lora_linear" (also stored in `model.tuneforge.lora_kernels`).
    `enabled` None follows the model's kernel switch (`model.tuneforge.switches.kernels`).
    """
    base = peft_model.get_base_model()
    record = record_of(base)
    record.lora_kernels = []
    if not (record.switches.kernels if enabled is None else enabled):
        logger.info("fused LoRA off (kernels switched off): peft's own LoRA forward")
        return []
    if spec is None or not spec.kernels:
        logger.info("fused LoRA off: family %s has no proven kernels; peft's own LoRA forward",
                    spec.name if spec else base.config.model_type)
        return []
    reason = kernels_can_run(base) or unfusable_reason(peft_model)
    if reason:
        logger.info("fused LoRA off: %s; peft's own LoRA forward", reason)
        return []

    applied: list[str] = []
    claimed: set[int] = set()  # LoRA layers a fused block computes; their own forward is never called
    for plan_type, bind, separate, projections, field, fused, patch_name in _FUSED_BLOCKS:
        for name, plan in list(record.plans.items()):
            if not isinstance(plan, plan_type) or getattr(plan, field) is not separate:
                continue  # another layout (Phi-3's packed projections) or already fused
            block = base.get_submodule(name)
            layers = [getattr(block, p) for p in projections]
            if any(hasattr(layer, "lora_A") for layer in layers):
                # NF4 Q|K|V and gate|up as one group each unless TUNEFORGE_LORA_GROUPS=0 (decided here, once).
                fused_fn = functools.partial(fused, grouped=record.switches.lora_groups,
                                             nf4_gemv=record.switches.nf4_gemv)
                bind(base, name, block, dataclasses.replace(plan, **{field: fused_fn}))
                claimed.update(id(layer) for layer in layers)
                if patch_name not in applied:
                    applied.append(patch_name)
    from tuneforge.integration.weights import base_weight_parts

    linear_forward = functools.partial(_fused_linear_forward, nf4_gemv=record.switches.nf4_gemv)
    for name, layer in _lora_layers(base):
        if id(layer) in claimed:
            continue
        try:
            base_weight_parts(layer)  # raises for bases the kernels do not read (int8, transposed)
        except (NotImplementedError, TypeError, ValueError) as error:
            logger.info("LoRA layer %s keeps peft's forward: %s", name, error)
            continue
        layer.forward = types.MethodType(linear_forward, layer)
        if "lora_linear" not in applied:
            applied.append("lora_linear")
    record.lora_kernels = applied
    logger.info("fused LoRA: %s", ", ".join(applied) or "no LoRA layer fits")
    return applied
