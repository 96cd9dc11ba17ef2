"""GeGLU gate: gelu(gate) * up, with a Triton forward/backward, autograd Function and reference.

Used by the Gemma MLP (gelu with the tanh approximation, `gelu_pytorch_tanh`) and by models with
an exact-erf gelu. Like SwiGLU, the backward pass recomputes gelu from `gate` instead of saving
gelu(gate), so the MLP holds one [tokens, intermediate] tensor less per layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tuneforge.kernels._utils import gated_backward, gated_forward

_APPROXIMATIONS = ("none", "tanh")


@triton.jit
def _gelu_and_grad(a, TANH: tl.constexpr):
    """gelu(a) and gelu'(a) in fp32."""
    if TANH:
        # 0.5 a (1 + tanh(k (a + 0.044715 a^3))), k = sqrt(2/pi). tanh(z) = 2 sigmoid(2z) - 1
        # keeps to core Triton ops (no libdevice), which both the GPU and the interpreter have.
        a2 = a * a
        inner = 0.7978845608028654 * (a + 0.044715 * a2 * a)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        gelu = 0.5 * a * (1.0 + t)
        grad = 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * a2)
    else:
        # 0.5 a (1 + erf(a / sqrt 2)); derivative Phi(a) + a * phi(a).
        cdf = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))
        gelu = a * cdf
        grad = cdf + a * tl.exp(-0.5 * a * a) * 0.3989422804014327
    return gelu, grad


@triton.jit
def _geglu_fwd_kernel(GATE, UP, OUT, n, BLOCK: tl.constexpr, TANH: tl.constexpr):
    # int64 offsets: tokens * intermediate passes 2^31 for long packed batches.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    gelu, _ = _gelu_and_grad(a, TANH)
    tl.store(OUT + offs, (gelu * b).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd_kernel(DOUT, GATE, UP, DGATE, DUP, n, BLOCK: tl.constexpr, TANH: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    gelu, grad = _gelu_and_grad(a, TANH)
    tl.store(DGATE + offs, (dy * b * grad).to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + offs, (dy * gelu).to(DUP.dtype.element_ty), mask=mask)


def _check_approximate(approximate: str) -> None:
    if approximate not in _APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {_APPROXIMATIONS}, got {approximate!r}")


class GeGLUFunction(torch.autograd.Function):
    """Autograd wrapper: saves only gate and up; gelu is recomputed in the backward kernel."""

    @staticmethod
    def forward(ctx, gate, up, approximate):
        _check_approximate(approximate)
        tanh = approximate == "tanh"
        out, gate_f, up_f = gated_forward(_geglu_fwd_kernel, gate, up, TANH=tanh)
        ctx.save_for_backward(gate_f, up_f)
        ctx.shape = gate.shape
        ctx.tanh = tanh
        return out

    @staticmethod
    def backward(ctx, dout):
        gate_f, up_f = ctx.saved_tensors
        dgate, dup = gated_backward(_geglu_bwd_kernel, dout, gate_f, up_f, ctx.shape, TANH=ctx.tanh)
        return dgate, dup, None


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """gelu(gate) * up with the Triton kernel; gate, up: [...] same shape and dtype -> [...].

    approximate: "none" (erf gelu, transformers' "gelu") or "tanh" ("gelu_pytorch_tanh", Gemma).
    """
    return GeGLUFunction.apply(gate, up, approximate)


def reference_geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """Plain PyTorch gelu(gate) * up, in the inputs' dtype as the transformers MLP computes it."""
    _check_approximate(approximate)
    return torch.nn.functional.gelu(gate, approximate=approximate) * up
