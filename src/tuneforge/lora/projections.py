"""peft's LoRA layers as `kernels.lora.LoRAProjection`s, and the fused LoRA entry points that take them.

`projection_of` reads a peft LoRA layer (or a plain Linear / Linear4bit) into the tensors the
kernels take, refusing what they do not compute. The entry points `lora_linear`, `lora_qkv` and
`lora_mlp` take layers (or LoRAProjections) and choose the path:

- training and prefill: the autograd Functions of `kernels.lora`, NF4 Q|K|V and gate|up as one
  group unless `grouped` is False (`switches.lora_groups`);
- decode steps: when no gradient is wanted (grad mode off, or none of X, the biases and the
  adapters requires grad), X has at most `nf4_gemv.MAX_ROWS` rows and a base is NF4, each NF4 base
  goes through `patch.linear4bit.decode_matmul` (the packed weight read once, no dense copy) and
  the adapter through two small matmuls. Same formula, same dtypes; only the base product's
  summation order and, for 3+ rows of 16-bit X, the weight's rounding to X's dtype inside the dot
  differ from the GEMM.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tuneforge import switches
from tuneforge.integration.weights import base_weight_parts
from tuneforge.kernels import lora as ops
from tuneforge.kernels._utils import call_in_autocast_dtype
from tuneforge.kernels.lora import LoRAProjection, check_activation, check_inputs, gated, projection_forward
from tuneforge.kernels.nf4_gemv import MAX_ROWS as GEMV_MAX_ROWS
from tuneforge.kernels.nf4_gemv import nf4_matmul_unsupported
from tuneforge.kernels.rank_update import rank_update_
from tuneforge.patch.linear4bit import decode_matmul

__all__ = ["lora_linear", "lora_mlp", "lora_qkv", "projection_of"]


def projection_of(layer: nn.Module) -> LoRAProjection:
    """From a peft LoRA layer (its one active adapter) or a plain Linear / Linear4bit (no adapter).

    Raises for what the fused kernels do not compute: lora_dropout > 0 while training, DoRA and
    other variants, several active adapters, an adapter bias (lora_bias), a trainable base weight.
    """
    weight, quant_state, bias = base_weight_parts(layer)
    name = type(layer).__name__
    if weight.requires_grad:
        raise ValueError(
            f"{name}'s base weight requires grad; the fused LoRA kernels keep the base frozen "
            "(no dW) - freeze it, or leave this layer unpatched"
        )
    if not hasattr(layer, "lora_A") or layer.disable_adapters or layer.merged:
        # As peft: with adapters disabled or merged into W, the layer is its base.
        return LoRAProjection(weight, quant_state, bias)
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if not active:
        return LoRAProjection(weight, quant_state, bias)
    if len(active) > 1:
        raise NotImplementedError(f"{name} has {len(active)} active adapters {active}; the fused path takes one")
    adapter = active[0]
    if adapter in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(adapter, False):
        raise NotImplementedError(f"{name}: adapter {adapter!r} is a LoRA variant (DoRA, ...); only plain LoRA is fused")
    dropout = layer.lora_dropout[adapter]
    if isinstance(dropout, nn.Dropout) and dropout.p > 0 and dropout.training:
        raise ValueError(
            f"{name}: adapter {adapter!r} has lora_dropout={dropout.p}; the fused LoRA kernels need "
            "lora_dropout=0 (set it in the LoRA config)"
        )
    if not isinstance(dropout, (nn.Identity, nn.Dropout)):
        raise NotImplementedError(f"{name}: lora_dropout is a {type(dropout).__name__}, expected Identity or Dropout")
    lora_A, lora_B = layer.lora_A[adapter], layer.lora_B[adapter]
    if getattr(lora_B, "bias", None) is not None:
        raise NotImplementedError(f"{name}: adapter {adapter!r} has a lora_B bias (lora_bias=True); not fused")
    return LoRAProjection(weight, quant_state, bias, lora_A.weight, lora_B.weight, float(layer.scaling[adapter]))


def _projection(layer) -> LoRAProjection:
    return layer if isinstance(layer, LoRAProjection) else projection_of(layer)


def _grouped(grouped: bool | None) -> bool:
    return switches.current().lora_groups if grouped is None else grouped


def _gemv(nf4_gemv: bool | None) -> bool:
    return switches.current().nf4_gemv if nf4_gemv is None else nf4_gemv


# --- decode steps: no autograd, NF4 bases by decode_matmul ------------------------------------------


def _gemv_reads(quant_state) -> bool:
    return quant_state is not None and nf4_matmul_unsupported(quant_state) is None


def _is_decode_step(x: torch.Tensor, projections: list[LoRAProjection]) -> bool:
    """True when this call needs no gradient, has at most GEMV_MAX_ROWS rows and an NF4 base nf4_matmul reads.

    Checked on shapes and flags only, so a captured CUDA graph never depends on tensor values.
    """
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not 0 < rows <= GEMV_MAX_ROWS:
        return False
    if torch.is_grad_enabled() and (
        x.requires_grad or any(isinstance(t, torch.Tensor) and t.requires_grad for p in projections for t in p.as_args())
    ):
        return False
    return any(_gemv_reads(p.quant_state) for p in projections)


def _decode_projection(x: torch.Tensor, p: LoRAProjection, nf4_gemv: bool) -> torch.Tensor:
    """One projection without autograd; x: [..., in] -> [..., out] in x's dtype."""
    if _gemv_reads(p.quant_state):
        # a fresh contiguous [..., out], not a view
        y = decode_matmul(x, p.weight, p.quant_state, p.bias, nf4_gemv_on_cuda=nf4_gemv)
    else:
        y2, _ = projection_forward(x.reshape(-1, x.shape[-1]), p.weight, p.quant_state, p.bias, None, None, 1.0)
        y = y2.view(*x.shape[:-1], y2.shape[-1])
    if p.lora_A is not None:
        x2 = x.reshape(-1, x.shape[-1])
        rank_update_(y.view(-1, y.shape[-1]), x2 @ p.lora_A.to(x.dtype).t(), p.lora_B.to(x.dtype), p.scaling)
    return y


def _decode_qkv(x, projections, nf4_gemv):
    return tuple(_decode_projection(x, p, nf4_gemv) for p in projections)


def _decode_mlp(x, activation, gate, up, down, nf4_gemv):
    hidden = gated(_decode_projection(x, gate, nf4_gemv), _decode_projection(x, up, nf4_gemv), activation)
    return _decode_projection(hidden, down, nf4_gemv)


# --- entry points ---------------------------------------------------------------------------------


def lora_linear(x: torch.Tensor, layer, nf4_gemv: bool | None = None) -> torch.Tensor:
    """y = layer(x) by the fused kernels; for O projections.

    x: [..., in]; layer: a peft LoRA layer (one active adapter), a plain Linear / Linear4bit, or a
    LoRAProjection. nf4_gemv: decode steps on CUDA by our NF4 matmul instead of bitsandbytes' (None:
    the current `switches.nf4_gemv`; patch_lora binds the model's). Returns [..., out] in x's dtype.
    """
    p = _projection(layer)
    if _is_decode_step(x, [p]):
        check_inputs(x, p.as_args())
        return call_in_autocast_dtype(_decode_projection, x, p, _gemv(nf4_gemv))
    return ops.lora_linear(x, p)


def lora_qkv(x: torch.Tensor, q_layer, k_layer, v_layer, grouped: bool | None = None,
             nf4_gemv: bool | None = None):
    """(q_layer(x), k_layer(x), v_layer(x)) in one autograd node that saves x once.

    x: [..., hidden]; each layer as in `lora_linear` (layers without an adapter are allowed, e.g.
    peft's default targets q_proj and v_proj only). grouped: NF4 bases as one GEMM (None: the
    current `switches.lora_groups`); nf4_gemv as in `lora_linear`. Returns ([..., q_out], [..., kv_out],
    [..., kv_out]).
    """
    projections = [_projection(layer) for layer in (q_layer, k_layer, v_layer)]
    if _is_decode_step(x, projections):
        check_inputs(x, sum((p.as_args() for p in projections), ()))
        return call_in_autocast_dtype(_decode_qkv, x, projections, _gemv(nf4_gemv))
    return ops.lora_qkv(x, projections, _grouped(grouped))


def lora_mlp(x: torch.Tensor, gate_layer, up_layer, down_layer, activation: str = "silu",
             grouped: bool | None = None, nf4_gemv: bool | None = None) -> torch.Tensor:
    """down_layer(act(gate_layer(x)) * up_layer(x)) by the fused kernels.

    x: [..., hidden]; layers as in `lora_linear`; activation: "silu" (SwiGLU: Llama, Mistral, Qwen),
    "gelu_tanh" (Gemma's gelu_pytorch_tanh) or "gelu" (exact erf); grouped and nf4_gemv as in `lora_qkv`.
    Returns [..., hidden].
    """
    check_activation(activation)
    gate, up, down = (_projection(layer) for layer in (gate_layer, up_layer, down_layer))
    if _is_decode_step(x, [gate, up, down]):
        check_inputs(x, gate.as_args() + up.as_args())
        return call_in_autocast_dtype(_decode_mlp, x, activation, gate, up, down, _gemv(nf4_gemv))
    return ops.lora_mlp(x, gate, up, down, activation, _grouped(grouped))
