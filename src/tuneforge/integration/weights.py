"""The base weight of a Linear-like module, as the kernels read it: module, peft and bitsandbytes glue.

`base_weight_parts` finds (weight, quant_state, bias) behind a plain Linear, a bitsandbytes
Linear4bit (also under FSDP2, where the state lives on the module) or a peft LoRA layer, and
refuses what the kernels do not read; `get_base_weight` dequantises it (`kernels.nf4.dense_weight`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tuneforge.integration.bnb import standard_layout
from tuneforge.kernels.nf4 import dense_weight

__all__ = ["base_weight_parts", "get_base_weight"]


def base_weight_parts(module: nn.Module):
    """(weight, quant_state, bias) of a Linear, a bitsandbytes Linear4bit or a peft LoRA layer's base.

    Nothing is dequantised: weight is the dense [out, in] Parameter (quant_state None) or the
    packed 4-bit data with its QuantState. bias: [out] or None.

    Under FSDP2, inside the forward/backward of the layer's shard unit, the weight is the
    all-gathered plain tensor (the packed bytes typed as the quant storage dtype): FSDP2 does not
    keep the Params4bit subclass, so its quant_state is read from the Linear4bit module, where
    bitsandbytes also keeps it for this case. Outside the unit's forward the weight is a sharded
    DTensor holding 1/N of the bytes, which nothing can multiply by: a clear error.
    """
    if getattr(module, "fan_in_fan_out", False):
        raise NotImplementedError(f"{type(module).__name__} stores its weight transposed (fan_in_fan_out)")
    if hasattr(module, "get_base_layer"):  # peft LoraLayer and friends
        module = module.get_base_layer()
    weight = getattr(module, "weight", None)
    if weight is None:
        raise TypeError(f"{type(module).__name__} has no weight; expected a Linear-like layer")
    if hasattr(weight, "_local_tensor"):  # a DTensor: FSDP2's shard, not gathered here
        raise ValueError(
            f"{type(module).__name__}'s weight is an FSDP2 shard (DTensor {tuple(weight._local_tensor.shape)} of "
            f"{tuple(weight.shape)}); it is whole only inside its shard unit's forward and backward"
        )
    bias = getattr(module, "bias", None)
    if getattr(weight, "quant_state", None) is None and getattr(module, "quant_state", None) is not None:
        # FSDP2's gathered weight: a plain tensor; bitsandbytes keeps the state on the module.
        return weight, module.quant_state, bias
    if hasattr(weight, "quant_state") or type(weight).__name__ == "Params4bit":
        if weight.quant_state is None:
            raise ValueError(f"{type(module).__name__}'s 4-bit weight is not quantised yet (quant_state is None)")
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            standard_layout(module)  # bitsandbytes repacked it for its CPU gemm (an eval forward)
        return weight, weight.quant_state, bias
    if hasattr(weight, "SCB") or type(weight).__name__ == "Int8Params":
        raise NotImplementedError(
            f"{type(module).__name__} holds an 8-bit (LLM.int8) weight; the fused LoRA kernels take "
            "16/32-bit or NF4 bases only"
        )
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{type(module).__name__}'s weight has dtype {weight.dtype}; expected a float weight")
    return weight, None, bias


def get_base_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense [out, in] weight of a Linear, a bitsandbytes Linear4bit, or a peft LoRA layer's base.

    dtype: the dtype wanted (default: the weight's own, or quant_state.dtype for 4-bit).
    A 4-bit weight is dequantised (a new tensor); a dense one is returned as is (cast if asked).
    """
    weight, quant_state, _ = base_weight_parts(module)
    return dense_weight(weight, quant_state, dtype)
