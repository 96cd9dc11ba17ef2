"""Rank-r update y += s * XA @ B^T in one pass over y: the LoRA term added onto a base product.

y: [T, N], XA: [T, r] (the small product X @ A^T, or dY @ B in the backward), B^T given as any
[N, r]-strided view (lora_B itself, or lora_A.t() for dX). A PyTorch reference is `addmm_`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tuneforge.kernels._utils import check_device
from tuneforge.kernels.launcher import launch

__all__ = ["MAX_RANK", "launch_rank_update_", "rank_update_", "reference_rank_update"]

MAX_RANK = 64  # the largest r one tile holds; larger ranks go to addmm_


@triton.jit
def _rank_update_kernel(
    Y,  # [T, N] in/out: y += scale * XA @ Bt^T
    XA,  # [T, R]
    BT,  # [N, R] via strides (B itself, or A^T read through A's strides)
    T, N, R,
    stride_y, stride_xa, stride_bn, stride_br,
    scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # A rank-r update touches all of Y but does almost no arithmetic: it is one read and one
    # write of Y. cuBLAS picks a GEMM kernel with K=16 that runs ~2.4x slower than that on H100
    # (52 ms a step for the 8B shape, profiled); this tile kernel streams Y once.
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    xa = tl.load(XA + rm[:, None] * stride_xa + rr[None, :], mask=(rm[:, None] < T) & (rr[None, :] < R), other=0.0)
    bt = tl.load(BT + rn[:, None] * stride_bn + rr[None, :] * stride_br,
                 mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0)
    # fp32 operands: bf16/fp16 values are exact in tf32 (10 mantissa bits), so this equals a 16-bit
    # dot on the GPU; and Triton's CPU interpreter mis-computes bf16 dots (tests run there).
    product = tl.dot(xa.to(tl.float32), tl.trans(bt.to(tl.float32)))  # [BLOCK_M, BLOCK_N]
    mask = (rm[:, None] < T) & (rn[None, :] < N)
    pointers = Y + rm[:, None] * stride_y + rn[None, :]
    y = tl.load(pointers, mask=mask, other=0.0).to(tl.float32)
    tl.store(pointers, (y + scale * product).to(Y.dtype.element_ty), mask=mask)


def rank_update_(y: torch.Tensor, xa: torch.Tensor, b_t: torch.Tensor, scale: float) -> torch.Tensor:
    """y += scale * xa @ b_t^T in place, one pass over y.

    y: [T, N] (unit stride along N), xa: [T, r], b_t: [N, r] (any strides: lora_B [out, r] for
    the forward, lora_A.t() [in, r] for dX). Falls back to `addmm_` where Triton can't run, for
    fp32 y (where tl.dot would round through tf32), and for r > 64.
    """
    if (y.device.type != "cuda" or y.dtype == torch.float32 or xa.shape[1] > MAX_RANK or y.stride(1) != 1
            or xa.stride(1) != 1):
        return y.addmm_(xa, b_t.t(), alpha=scale)
    return launch_rank_update_(y, xa, b_t, scale)


def launch_rank_update_(y: torch.Tensor, xa: torch.Tensor, b_t: torch.Tensor, scale: float) -> torch.Tensor:
    """The Triton kernel of `rank_update_`, unconditionally (tests call it under the interpreter)."""
    check_device(y, xa, b_t)
    r = xa.shape[1]
    xa = xa.to(y.dtype)
    if xa.stride(1) != 1:  # the kernel takes a row stride: column slices of a wider XA are read in place
        xa = xa.contiguous()
    b_t = b_t.to(y.dtype)
    rows, cols = y.shape
    block_r = max(16, triton.next_power_of_2(r))
    block_m, block_n = 64, 128
    grid = (triton.cdiv(rows, block_m), triton.cdiv(cols, block_n))
    launch(_rank_update_kernel, grid,
        y, xa, b_t, rows, cols, r, y.stride(0), xa.stride(0), b_t.stride(0), b_t.stride(1), float(scale),
        # A 64-wide rank (grouped projections) holds three fp32 tiles per program: 8 warps keep
        # them in registers.
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=8 if block_r >= 64 else 4,
    )
    return y


def reference_rank_update(y: torch.Tensor, xa: torch.Tensor, b_t: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain PyTorch y + scale * xa @ b_t^T (out of place), in y's dtype."""
    return torch.addmm(y, xa.to(y.dtype), b_t.to(y.dtype).t(), alpha=scale)
