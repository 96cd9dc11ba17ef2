"""RMSNorm: Triton forward/backward, its autograd Function, and the PyTorch reference.

    y = x / sqrt(mean(x^2, -1) + eps) * (offset + weight)

Families differ in where the result is rounded to the input dtype, and the kernel follows each:
- Llama, Mistral, Qwen, Phi-3 (`offset=0`): the normalised x is cast to the input dtype first, then
  multiplied by the weight (`weight * x_hat.to(dtype)`).
- Gemma (`offset=1`, the weight is stored as w - 1) and OLMo-2: the product is taken in fp32 and
  cast once at the end.
`cast_before_weight` picks the rule; by default it follows `offset` (0: cast first, else fp32).

The output is always in x's dtype. (transformers' LlamaRMSNorm with an fp32 weight and a bf16 x
promotes its output to fp32; the patched model keeps activations in the compute dtype instead.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tuneforge import switches
from tuneforge.kernels._utils import (
    check_device,
    check_float,
    check_row_param,
    num_programs_for_rows,
    param_grad_partials,
    reduce_param_grad,
    row_launch,
    row_tile_launch,
    rows_view,
)
from tuneforge.kernels.launcher import launch


@triton.jit
def _rms_norm_fwd_kernel(
    X, W, Y, RSTD,
    stride_x, stride_y, n_rows, n_cols,
    eps, offset,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr, EVEN: tl.constexpr,
):
    # A [ROWS, BLOCK] tile of whole rows per program: x is read once into registers; short rows
    # are stacked so that each program still moves a few thousand elements.
    row0 = tl.program_id(0).to(tl.int64) * ROWS
    r = tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row_mask = row0 + r < n_rows
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    # 64-bit only for the tile's first row; offsets inside the tile are 32-bit (fewer registers
    # and address instructions per element; the host keeps ROWS * stride below 2^31).
    x_ptrs = X + row0 * stride_x + (r[:, None] * stride_x + cols[None, :])
    y_ptrs = Y + row0 * stride_y + (r[:, None] * stride_y + cols[None, :])
    # The weight is loaded before x is reduced, so its latency overlaps x's instead of adding to
    # the program's critical path after the reduction; every program reads it: keep it in L2.
    # x is read once here (the backward comes much later): evict it first.
    if EVEN:  # whole tiles (hidden a power of two, rows a multiple of ROWS): no masks at all
        w = tl.load(W + cols, eviction_policy="evict_last").to(tl.float32) + offset
        x = tl.load(x_ptrs, eviction_policy="evict_first").to(tl.float32)
    else:
        w = tl.load(W + cols, mask=cols < n_cols, other=0.0, eviction_policy="evict_last").to(tl.float32) + offset
        x = tl.load(x_ptrs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    # Saved for the backward pass: one fp32 per row instead of recomputing the reduction.
    tl.store(RSTD + row0 + r, rstd, mask=row_mask)
    x_hat = x * rstd[:, None]
    if CAST_BEFORE_WEIGHT:
        x_hat = x_hat.to(Y.dtype.element_ty).to(tl.float32)
    y = (x_hat * w[None, :]).to(Y.dtype.element_ty)
    if EVEN:
        tl.store(y_ptrs, y)
    else:
        tl.store(y_ptrs, y, mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL,
    stride_dy, stride_x, stride_dx,
    n_rows, n_cols, offset, rows_per_program,
    BLOCK: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr, COMPUTE_DW: tl.constexpr,
):
    # Each program walks a contiguous block of rows and keeps its share of dW in registers;
    # the partial sums [programs, hidden] are added by torch afterwards (no atomics, and the
    # result does not depend on scheduling).
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    start64 = row_start.to(tl.int64)
    DY += start64 * stride_dy
    X += start64 * stride_x
    DX += start64 * stride_dx
    for row in range(row_start, row_end):
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        x_hat = x * rstd
        g = dy * w
        # d/dx of x*rstd: rstd * (g - x_hat * mean(g * x_hat)).
        dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=0) / n_cols))
        tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            if CAST_BEFORE_WEIGHT:
                x_hat = x_hat.to(X.dtype.element_ty).to(tl.float32)
            dw_acc += dy * x_hat
        DY += stride_dy
        X += stride_x
        DX += stride_dx
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw_acc, mask=mask)


def _cast_before(offset: float, cast_before_weight: bool | None) -> bool:
    return offset == 0.0 if cast_before_weight is None else bool(cast_before_weight)


# Forward launch override for benchmarking, e.g. TUNEFORGE_RMS_NORM_FWD=2,8 (rows per program,
# warps; switches.rms_norm_launch); bench/kernels.py --rms-norm-sweep times the candidates. Unset:
# `_forward_launch`'s rule.
FWD_LAUNCH_ENV = switches.RMS_NORM_LAUNCH_ENV


def _forward_launch(hidden: int, row_stride: int) -> tuple[int, int, int]:
    """(BLOCK, ROWS, num_warps) of the forward kernel for rows of `hidden` elements."""
    block, rows, num_warps = row_tile_launch(hidden)
    override = switches.current().rms_norm_launch
    if override:
        rows, num_warps = override  # switches checked both (powers of two, warps up to 32)
    # The tile's 32-bit offsets must not overflow (only a row-strided view of a huge buffer could).
    while rows > 1 and rows * row_stride >= 2**31:
        rows //= 2
    return block, rows, num_warps


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper: saves x, weight and the per-row 1/rms (fp32); no normalised copy of x."""

    @staticmethod
    def forward(ctx, x, weight, eps, offset, cast_before_weight):
        check_device(x, weight)
        check_float("x", x)
        check_row_param("weight", weight, x)
        hidden = x.shape[-1]
        cast_before = _cast_before(offset, cast_before_weight)
        x2d = rows_view(x)
        weight = weight.contiguous()
        n_rows = x2d.shape[0]
        # Allocated in x's shape and returned as is: a view made inside a Function could not be
        # modified in place later (the attention rotates the q/k norm outputs in place).
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        y2d = y.view(n_rows, hidden)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block, rows, num_warps = _forward_launch(hidden, max(x2d.stride(0), hidden))
        if n_rows > 0:
            launch(_rms_norm_fwd_kernel, (triton.cdiv(n_rows, rows),),
                x2d, weight, y2d, rstd,
                x2d.stride(0), y2d.stride(0), n_rows, hidden,
                float(eps), float(offset),
                BLOCK=block, ROWS=rows, CAST_BEFORE_WEIGHT=cast_before,
                EVEN=block == hidden and n_rows % rows == 0, num_warps=num_warps,
            )
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.offset = float(offset)
        ctx.cast_before = cast_before
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, rstd = ctx.saved_tensors
        n_rows, hidden = x2d.shape
        dy2d = rows_view(dy)
        dx = torch.empty_like(x2d, memory_format=torch.contiguous_format)
        compute_dw = ctx.needs_input_grad[1]
        block, num_warps = row_launch(hidden)
        programs = num_programs_for_rows(n_rows, x2d.device, block)
        rows_per_program = triton.cdiv(n_rows, programs) if n_rows else 0
        # Frozen norm weights (the LoRA case) skip the dW partials entirely.
        dw_partial = param_grad_partials(programs, hidden, x2d.device, compute_dw)
        if n_rows > 0:
            launch(_rms_norm_bwd_kernel, (programs,),
                dy2d, x2d, weight, rstd, dx, dw_partial,
                dy2d.stride(0), x2d.stride(0), dx.stride(0),
                n_rows, hidden, ctx.offset, rows_per_program,
                BLOCK=block, CAST_BEFORE_WEIGHT=ctx.cast_before, COMPUTE_DW=compute_dw, num_warps=num_warps,
            )
        dw = reduce_param_grad(dw_partial, compute_dw, n_rows, hidden, weight.dtype)
        return dx.view(ctx.x_shape), dw, None, None, None


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    offset: float = 0.0,
    cast_before_weight: bool | None = None,
) -> torch.Tensor:
    """RMSNorm over the last dim with the Triton kernel.

    x: [..., hidden] (fp32/fp16/bf16), weight: [hidden] -> y: [..., hidden] in x.dtype.
    offset: added to the weight (1.0 for Gemma, whose checkpoints store weight - 1).
    cast_before_weight: round x_hat to x.dtype before multiplying by the weight (Llama) or
    multiply in fp32 (Gemma, OLMo-2); None follows `offset` (0.0 -> True, else False).
    """
    return RMSNormFunction.apply(x, weight, eps, offset, cast_before_weight)


def reference_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    offset: float = 0.0,
    cast_before_weight: bool | None = None,
) -> torch.Tensor:
    """Plain PyTorch RMSNorm with the same arguments and rounding as `rms_norm`.

    With offset=0 it performs transformers' LlamaRMSNorm operations in their order; with
    offset=1 GemmaRMSNorm's; so in fp32 it equals those modules bit for bit.
    """
    input_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if _cast_before(offset, cast_before_weight):
        w = weight if offset == 0.0 else offset + weight
        return (w * h.to(input_dtype)).to(input_dtype)
    return (h * (offset + weight.float())).to(input_dtype)
