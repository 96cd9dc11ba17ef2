"""Mixture-of-experts models: NF4 storage for stacked expert weights, and the experts' forwards.

transformers 5 keeps a MoE layer's experts in one `*Experts` module holding stacked 3-D
parameters (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]; gpt-oss stores them transposed,
with biases), marked by its `use_experts_implementation` decorator (`is_transposed`, `has_bias`,
`_apply_gate`). bitsandbytes quantises only nn.Linear, so a 4-bit load would leave the experts,
most of a MoE model's memory, dense. Here:

- `quantize_experts` stores each stacked weight as NF4 (bitsandbytes' `quantize_4bit` of the
  flattened stack: blocks of 64 values, double-quantised absmax; a block never straddles two
  experts because each expert holds a multiple of 64 values) in a buffer `<name>_nf4`, with its
  QuantState. The parameter itself becomes a stand-in of the right shape, dtype and device (so
  peft's `target_parameters` wraps it exactly as on the 16-bit model, and the adapter's format
  is the same) that holds one NaN broadcast over the shape: anything that reads it instead of
  the NF4 storage gets NaN, loudly, never silently wrong numbers. A 4-bit load quantises each
  stack the moment transformers sets it (`quantizing_class`), so the dense experts never exist
  all at once (peak: the NF4 model plus one dense stack). The experts module's forward
  (on the instance) then runs `kernels.moe` on the NF4 weights; when plain peft has
  parametrized a stand-in (its ParamWrapper forward), the parametrization (W + s B A) is applied
  to the dequantised weight, which is what peft computes on a 16-bit model.
- `patch_moe_lora` routes peft's outermost `ParamWrapper` of each experts module (LoRA on the
  stacked weights) through `kernels.moe.moe_experts`: LoRA factored, weights dequantised per
  pass, for 16-bit and NF4 bases alike.
- `dequantize_experts` turns NF4 experts back into dense parameters (merging, export).
"""

from __future__ import annotations

import logging
import types

import torch
from torch import nn

from tuneforge.kernels.moe import ExpertProjection, moe_experts, reference_moe
from tuneforge.models.families import FamilySpec

logger = logging.getLogger(__name__)

NF4_BLOCKSIZE = 64


def experts_modules(model: nn.Module, spec: FamilySpec | None) -> list[tuple[str, nn.Module]]:
    """(name, module) of every experts module holding the family's stacked parameters `spec.experts`."""
    if spec is None or not spec.experts:
        return []
    found = []
    for name, module in model.named_modules():
        if not hasattr(module, "_apply_gate"):
            continue
        params = [getattr(module, p, None) for p in spec.experts]
        if all(isinstance(p, torch.Tensor) and p.dim() == 3 for p in params):
            found.append((name, module))
    return found


def is_nf4(experts: nn.Module) -> bool:
    return bool(getattr(experts, "_tuneforge_nf4", None))


def _stand_in(shape, dtype, device) -> nn.Parameter:
    """A frozen parameter of `shape` holding one NaN broadcast over it (no memory)."""
    return nn.Parameter(torch.full((1,) * len(shape), float("nan"), dtype=dtype, device=device).expand(shape),
                        requires_grad=False)


def _store_nf4(experts: nn.Module, name: str, weight: torch.Tensor, where: str = "") -> bool:
    """Quantise the stack `weight` into `experts`' NF4 storage and put the stand-in in its place;
    False (nothing changed) when its experts do not each hold a multiple of 64 values."""
    import bitsandbytes.functional as bnbf

    if weight[0].numel() % NF4_BLOCKSIZE:
        logger.warning("%s.%s stays dense: %d values per expert is not a multiple of %d",
                       where, name, weight[0].numel(), NF4_BLOCKSIZE)
        return False
    packed, state = bnbf.quantize_4bit(weight.detach().contiguous(), blocksize=NF4_BLOCKSIZE,
                                       compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8)
    # Kept off the module's buffers until the load is over: transformers re-creates the buffers it
    # did not load (with uninitialised memory) after setting the weights. quantize_experts registers it.
    experts.__dict__.setdefault("_tuneforge_nf4_arriving", {})[name] = packed.reshape(-1)
    experts.__dict__.setdefault("_tuneforge_nf4", {})[name] = state
    stand_in = _stand_in(weight.shape, weight.dtype, weight.device)
    stand_in._is_hf_initialized = True  # transformers must not initialise it after loading
    stand_in.tuneforge_nf4 = (packed.reshape(-1), state)  # what a merged export reads (export.merge)
    nn.Module.__setattr__(experts, name, stand_in)
    return True


def quantize_experts(model: nn.Module, spec: FamilySpec | None) -> int:
    """Store the stacked expert weights of `model` as NF4 (double-quantised); returns how many are.

    Stacks already stored while loading (`quantizing_class`) are counted, not quantised again.
    Weights whose experts do not each hold a multiple of 64 values stay dense (logged): an NF4
    block would straddle two experts.
    """
    count = 0
    for module_name, experts in experts_modules(model, spec):
        experts.__class__ = _LOADING_BASES.get(type(experts), type(experts))  # the family's own class again
        for name in spec.experts:
            stored = name in getattr(experts, "_tuneforge_nf4", {})
            count += stored or _store_nf4(experts, name, getattr(experts, name), module_name)
        for name, packed in experts.__dict__.pop("_tuneforge_nf4_arriving", {}).items():
            experts.register_buffer(f"{name}_nf4", packed, persistent=False)
        if is_nf4(experts):
            experts.forward = types.MethodType(_nf4_experts_forward, experts)
    if count:
        logger.info("experts: %d stacked weights stored as NF4 (kernels.moe computes them)", count)
    return count


# Experts classes that quantise their stacks as from_pretrained sets them -> the family's class.
_LOADING_BASES: dict[type, type] = {}


def _quantizing_experts_class(cls: type, names: tuple[str, ...]) -> type:
    for loading, base in _LOADING_BASES.items():
        if base is cls:
            return loading

    def __setattr__(self, name, value):
        # transformers 5 sets every loaded weight with setattr (core_model_loading.set_param_for_module),
        # on its device: a stack is quantised the moment it arrives and its dense copy is dropped.
        if (name in names and isinstance(value, torch.Tensor) and value.dim() == 3 and value.is_floating_point()
                and value.device.type != "meta" and _store_nf4(self, name, value)):
            return
        cls.__setattr__(self, name, value)

    loading = type(cls.__name__, (cls,), {"__setattr__": __setattr__, "__module__": cls.__module__})
    _LOADING_BASES[loading] = cls
    return loading


def quantizing_class(model_class: type, spec: FamilySpec) -> type:
    """A subclass of `model_class` (for one from_pretrained call) whose experts modules store each
    stacked weight as NF4 as soon as it is loaded, so that a 4-bit load holds one dense stack at a
    time instead of every expert of the model in the compute dtype (Qwen3-30B-A3B: ~57 GiB bf16).
    It keeps `model_class`'s name and module (transformers reads both); `quantize_experts` after
    the load gives the experts modules their own class back and their NF4 forward."""

    def __init__(self, config, *args, **kwargs):
        model_class.__init__(self, config, *args, **kwargs)
        for _, experts in experts_modules(self, spec):
            experts.__class__ = _quantizing_experts_class(type(experts), spec.experts)

    return type(model_class.__name__, (model_class,), {
        "__init__": __init__, "__module__": model_class.__module__, "__qualname__": model_class.__qualname__,
    })


def dequantize_experts(model: nn.Module) -> int:
    """Make NF4 experts dense again (their compute dtype), e.g. before merging LoRA; returns how many."""
    count = 0
    for experts in model.modules():
        states = getattr(experts, "_tuneforge_nf4", None)
        if not states:
            continue
        for name, state in list(states.items()):
            packed = getattr(experts, f"{name}_nf4")
            from tuneforge.kernels.moe import dequantize_stack

            dense = dequantize_stack(packed, state, state.dtype)
            # Under peft the stand-in may be wrapped: set the module's own parameter.
            experts._parameters[name] = nn.Parameter(dense, requires_grad=False)
            del experts._buffers[f"{name}_nf4"]
            del states[name]
            count += 1
        if "forward" in experts.__dict__:
            del experts.forward  # transformers' own forward again
    return count


def _projection(experts: nn.Module, name: str, dtype: torch.dtype | None = None, lora=None) -> ExpertProjection:
    """The stacked projection `name` of `experts`: NF4 storage or the dense parameter, bias, LoRA."""
    states = getattr(experts, "_tuneforge_nf4", None) or {}
    bias = getattr(experts, f"{name}_bias", None) if getattr(experts, "has_bias", False) else None
    transposed = bool(getattr(experts, "is_transposed", False))
    a, b, s = lora if lora is not None else (None, None, 1.0)
    if name in states:
        return ExpertProjection(nf4=(getattr(experts, f"{name}_nf4"), states[name]), bias=bias, lora_A=a,
                                lora_B=b, scaling=s, transposed=transposed)
    # The module's own tensor, not a parametrization peft may have put on it.
    weight = experts.parametrizations[name].original if _parametrized(experts, name) else getattr(experts, name)
    return ExpertProjection(weight=weight, bias=bias, lora_A=a, lora_B=b, scaling=s, transposed=transposed)


def _parametrized(module: nn.Module, name: str) -> bool:
    return torch.nn.utils.parametrize.is_parametrized(module, name)


def _nf4_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """An NF4 experts module's forward: hidden_states [T, H], top_k_index / top_k_weights [T, K] -> [T, H]."""
    gate_up, down = (_projection(self, name) for name in ("gate_up_proj", "down_proj"))
    if not any(_parametrized(self, name) for name in ("gate_up_proj", "down_proj")):
        return moe_experts(hidden_states, top_k_index, top_k_weights, gate_up, down, self._apply_gate)
    # Plain peft's ParamWrapper forward is active: it parametrized the stand-ins with W -> W + s B A.
    # Apply that to the dequantised weights, as peft does to a 16-bit model's (dense, memory-hungry:
    # FastLanguageModel.get_peft_model's patch_moe_lora avoids it).
    dtype = hidden_states.dtype
    dense = []
    for name, projection in (("gate_up_proj", gate_up), ("down_proj", down)):
        weight = projection.dense(dtype)
        weight = weight.transpose(1, 2) if projection.transposed else weight  # back to the stored layout
        if _parametrized(self, name):
            for parametrization in self.parametrizations[name]:
                weight = parametrization(weight)
        dense.append(ExpertProjection(weight=weight, bias=projection.bias, transposed=projection.transposed))
    return reference_moe(hidden_states, top_k_index, top_k_weights, *dense, self._apply_gate)


# --- LoRA on the stacked experts (peft's target_parameters) ----------------------------------------


def _wrapper_chain(wrapper: nn.Module):
    """(experts module, {parameter name: ParamWrapper}) under an outermost peft ParamWrapper."""
    from peft.tuners.lora.layer import ParamWrapper

    wrappers, module = {}, wrapper
    while isinstance(module, ParamWrapper):
        wrappers[module.parameter_name] = module
        module = module.base_layer
    return module, wrappers


def lora_factors(wrapper: nn.Module, adapter: str):
    """(A [E, r, in], B [E, out, r], scaling) of a peft ParamWrapper, as peft's get_delta_factors reads
    them (lora_A.weight [r*E, in] expert-major; lora_B.weight [out, r*E] expert-minor)."""
    a = wrapper.lora_A[adapter].weight
    b = wrapper.lora_B[adapter].weight
    experts = wrapper.num_experts
    return (a.reshape(experts, -1, a.shape[-1]), b.reshape(b.shape[0], -1, experts).permute(2, 0, 1),
            wrapper.scaling[adapter])


def _unfused_reason(wrapper, experts, wrappers) -> str | None:
    if wrapper.disable_adapters or wrapper.merged:
        return "adapters disabled or merged"
    adapters = list(wrapper.active_adapters)
    if len(adapters) != 1:
        return f"{len(adapters)} active adapters"
    if any(adapters[0] not in w.lora_A for w in wrappers.values()):
        return f"adapter {adapters[0]!r} is not on every wrapped parameter"
    if set(wrappers) - {"gate_up_proj", "down_proj"}:
        return f"LoRA on {sorted(set(wrappers) - {'gate_up_proj', 'down_proj'})} (only the two stacked weights fuse)"
    for name in ("gate_up_proj", "down_proj"):
        if name not in getattr(experts, "_tuneforge_nf4", {}) and getattr(experts, name).requires_grad:
            return f"{name} is trainable (full fine-tuning of the experts)"
    return None


def _fused_experts_lora_forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
    """The outermost ParamWrapper's forward by `moe_experts`: hidden_states [T, H] -> [T, H]."""
    experts, wrappers = _wrapper_chain(self)
    reason = args or kwargs or _unfused_reason(self, experts, wrappers)
    if reason:
        return type(self).forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs)
    adapter = self.active_adapters[0]
    gate_up, down = (_projection(experts, name, lora=lora_factors(wrappers[name], adapter) if name in wrappers else None)
                     for name in ("gate_up_proj", "down_proj"))
    return moe_experts(hidden_states, top_k_index, top_k_weights, gate_up, down, experts._apply_gate)


def patch_moe_lora(peft_model, spec: FamilySpec | None, enabled: bool) -> list[str]:
    """Route LoRA on stacked experts through `kernels.moe`; returns ["moe_lora"] when any was routed.

    enabled False keeps peft's ParamWrapper forward (W + s B A materialised per forward), which
    the NF4 experts forward also supports.
    """
    from peft.tuners.lora.layer import ParamWrapper

    base = peft_model.get_base_model()
    outer = [m for name, m in base.named_modules() if isinstance(m, ParamWrapper)
             and not name.endswith(".base_layer") and hasattr(_wrapper_chain(m)[0], "_apply_gate")]
    if not outer:
        return []
    if not enabled:
        logger.info("LoRA on %d experts modules: peft's own forward (kernels off)", len(outer))
        return []
    for wrapper in outer:
        wrapper.forward = types.MethodType(_fused_experts_lora_forward, wrapper)
    logger.info("LoRA on %d experts modules: kernels.moe (grouped, LoRA factored)", len(outer))
    return ["moe_lora"]
