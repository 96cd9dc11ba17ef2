"""SwiGLU gate: silu(gate) * up, with a Triton forward/backward, autograd Function and reference.

Used by the Llama/Mistral/Qwen MLP: down_proj(silu(gate_proj(x)) * up_proj(x)). The backward pass
recomputes silu from `gate` rather than saving silu(gate): one [tokens, intermediate] tensor less
held per layer, which is the largest activation of the MLP.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tuneforge.kernels._utils import gated_backward, gated_forward


@triton.jit
def _silu_and_grad(a):
    """silu(a) and silu'(a) in fp32: silu'(a) = s + a * s * (1 - s) = s * (1 + a * (1 - s)), s = sigmoid(a)."""
    s = tl.sigmoid(a)
    return a * s, s * (1.0 + a * (1.0 - s))


@triton.jit
def _swiglu_fwd_kernel(GATE, UP, OUT, n, BLOCK: tl.constexpr):
    # int64 offsets: tokens * intermediate passes 2^31 for long packed batches.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    silu, _ = _silu_and_grad(a)
    tl.store(OUT + offs, (silu * b).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DOUT, GATE, UP, DGATE, DUP, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    silu = a * s
    # _silu_and_grad's derivative, multiplied in this order ((dy * b) * s) * (...): the order the
    # kernel has always used (another order can differ in the last bit).
    tl.store(DGATE + offs, (dy * b * s * (1.0 + a * (1.0 - s))).to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + offs, (dy * silu).to(DUP.dtype.element_ty), mask=mask)


class SwiGLUFunction(torch.autograd.Function):
    """Autograd wrapper: saves only gate and up; silu is recomputed in the backward kernel."""

    @staticmethod
    def forward(ctx, gate, up):
        out, gate_f, up_f = gated_forward(_swiglu_fwd_kernel, gate, up)
        ctx.save_for_backward(gate_f, up_f)
        ctx.shape = gate.shape
        return out

    @staticmethod
    def backward(ctx, dout):
        gate_f, up_f = ctx.saved_tensors
        return gated_backward(_swiglu_bwd_kernel, dout, gate_f, up_f, ctx.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up with the Triton kernel; gate, up: [...] same shape and dtype -> [...]."""
    return SwiGLUFunction.apply(gate, up)


def reference_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch silu(gate) * up, in the inputs' dtype as the transformers MLP computes it."""
    return torch.nn.functional.silu(gate) * up
