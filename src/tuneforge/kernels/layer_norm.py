"""LayerNorm: Triton forward/backward, its autograd Function, and the PyTorch reference.

    y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias      (biased variance, as nn.LayerNorm)

Everything is computed in fp32 and rounded once to x's dtype, which is what torch's own
layer_norm kernels do for fp16/bf16 inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
def _layer_norm_fwd_kernel(
    X, W, B, Y, MEAN, RSTD,
    stride_x, stride_y, n_rows, n_cols, eps,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    # A [ROWS, BLOCK] tile of whole rows per program, kept in registers for both moments and
    # the output; short rows are stacked so each program moves a few thousand elements.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / n_cols
    # Two-pass variance on the register-resident rows: no cancellation from E[x^2] - E[x]^2.
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / n_cols + eps)
    tl.store(MEAN + rows, mean, mask=row_mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)
    y = xc * rstd[:, None] * tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(
    DY, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL,
    stride_dy, stride_x, stride_dx,
    n_rows, n_cols, rows_per_program,
    BLOCK: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
):
    # A block of rows per program; dW/dB partial sums stay in registers and are written once
    # per program, then summed by torch (deterministic, no atomics).
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    start64 = row_start.to(tl.int64)
    DY += start64 * stride_dy
    X += start64 * stride_x
    DX += start64 * stride_dx
    for row in range(row_start, row_end):
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
        g = dy * w
        # dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))
        dx = rstd * (g - tl.sum(g, axis=0) / n_cols - x_hat * (tl.sum(g * x_hat, axis=0) / n_cols))
        tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw_acc += dy * x_hat
        if COMPUTE_DB:
            db_acc += dy
        DY += stride_dy
        X += stride_x
        DX += stride_dx
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw_acc, mask=mask)
    if COMPUTE_DB:
        tl.store(DB_PARTIAL + pid * n_cols + cols, db_acc, mask=mask)


class LayerNormFunction(torch.autograd.Function):
    """Autograd wrapper: saves x, weight and per-row mean and 1/std (fp32)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        check_device(x, weight, *([bias] if bias is not None else []))
        check_float("x", x)
        check_row_param("weight", weight, x)
        if bias is not None:
            check_row_param("bias", bias, x)
        hidden = x.shape[-1]
        x2d = rows_view(x)
        weight = weight.contiguous()
        has_bias = bias is not None
        bias_arg = bias.contiguous() if has_bias else weight  # unused pointer when HAS_BIAS is False
        n_rows = x2d.shape[0]
        y = torch.empty((n_rows, hidden), dtype=x.dtype, device=x.device)
        mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block, rows, num_warps = row_tile_launch(hidden)
        if n_rows > 0:
            launch(_layer_norm_fwd_kernel, (triton.cdiv(n_rows, rows),),
                x2d, weight, bias_arg, y, mean, rstd,
                x2d.stride(0), y.stride(0), n_rows, hidden, float(eps),
                BLOCK=block, ROWS=rows, HAS_BIAS=has_bias, num_warps=num_warps,
            )
        ctx.save_for_backward(x2d, weight, mean, rstd)
        ctx.x_shape = x.shape
        ctx.bias_dtype = bias.dtype if has_bias else None
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, mean, rstd = ctx.saved_tensors
        n_rows, hidden = x2d.shape
        dy2d = rows_view(dy)
        dx = torch.empty_like(x2d, memory_format=torch.contiguous_format)
        compute_dw = ctx.needs_input_grad[1]
        compute_db = ctx.needs_input_grad[2]
        block, num_warps = row_launch(hidden)
        programs = num_programs_for_rows(n_rows, x2d.device, block)
        rows_per_program = triton.cdiv(n_rows, programs) if n_rows else 0
        dw_partial = param_grad_partials(programs, hidden, x2d.device, compute_dw)
        db_partial = param_grad_partials(programs, hidden, x2d.device, compute_db)
        if n_rows > 0:
            launch(_layer_norm_bwd_kernel, (programs,),
                dy2d, x2d, weight, mean, rstd, dx, dw_partial, db_partial,
                dy2d.stride(0), x2d.stride(0), dx.stride(0),
                n_rows, hidden, rows_per_program,
                BLOCK=block, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db, num_warps=num_warps,
            )
        dw = reduce_param_grad(dw_partial, compute_dw, n_rows, hidden, weight.dtype)
        db = reduce_param_grad(db_partial, compute_db, n_rows, hidden, ctx.bias_dtype)
        return dx.view(ctx.x_shape), dw, db, None


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """LayerNorm over the last dim with the Triton kernel.

    x: [..., hidden] (fp32/fp16/bf16), weight: [hidden], bias: [hidden] or None
    -> y: [..., hidden] in x.dtype.
    """
    return LayerNormFunction.apply(x, weight, bias, eps)


def reference_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Plain PyTorch LayerNorm, fp32 inside and one rounding to x.dtype, like `layer_norm`."""
    h = x.to(torch.float32)
    mean = h.mean(-1, keepdim=True)
    hc = h - mean
    y = hc * torch.rsqrt(hc.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
