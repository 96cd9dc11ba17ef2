"""y = x @ W^T (+ bias) for a few rows of x and a bitsandbytes NF4 weight W, reading W packed once.

A decode step multiplies 1-8 rows (batch x new tokens) by every weight. Dequantising W to bf16 and
then running a GEMM moves the 4-bit weight in, 16 bits per element out, and 16 bits per element in
again: about 9x the bytes of the packed weight (a 14336x4096 bf16 weight is 117 MB against 29 MB
packed). Here each program streams its rows of packed codes once, dequantises them in registers
(the arithmetic of `kernels.nf4`, whose docstring describes the storage) and multiplies them into
the few rows of x, so the weight costs its packed bytes plus the 8-bit absmax codes.

Two inner products, picked by the row count (a constexpr, so one compiled kernel per choice):
- FMA: products summed elementwise in fp32 and reduced once at the end; no padding, best for 1-2
  rows, and the only path for fp32 x (exact fp32, where a tensor-core dot would round to tf32).
- DOT: the dequantised tile is rounded to x's 16-bit dtype (what `dequantize_nf4` would have
  stored) and fed to a tensor-core dot with x padded to 16 rows: the dequantisation cost stays
  the same while 3-8 rows of FMAs would make the loop compute-bound.

The two codes of a packed byte are the weight's elements 2j and 2j+1; rather than interleaving
them, x is read as its even and odd columns and each half is multiplied by its own nibble.

Split-K: with few output rows the grid has only N / BLOCK_N programs (32 for a 1024-row K/V
projection), too few to keep every SM streaming. Each program then covers one K range and writes
an fp32 partial [split, M, N]; a second small kernel sums them in a fixed order (deterministic,
unlike atomics) and adds the bias. Both launches take shapes only, so the call is capturable in a
CUDA graph: no host synchronisation and no branch on tensor values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tuneforge.kernels._utils import _num_sms, check_float, needs_bf16_rounding, round_bf16_rtne, rows_view
from tuneforge.kernels.launcher import launch
from tuneforge.kernels.nf4 import _launch_args, block_absmax, reference_dequantize_nf4
from tuneforge.switches import TRITON_INTERPRETER

__all__ = [
    "MAX_ROWS", "GemvConfig", "default_config", "nf4_matmul", "nf4_matmul_unsupported",
    "reference_nf4_matmul",
]

# The row count nf4_matmul is built for (a decode step of batch x new tokens); the dot path pads
# x to 16 rows, so above 8 the padding would be at most half used and a dequantise+GEMM catches up.
MAX_ROWS = 8
_DOT_ROWS = 16  # tl.dot's smallest M
# Triton's CPU interpreter computes 16-bit dots wrongly; there the dot path multiplies fp32 copies
# of the same (16-bit-rounded) values (DOT_FP32=TRITON_INTERPRETER).


@dataclass(frozen=True)
class GemvConfig:
    """Launch choice for one nf4_matmul call.

    block_n:   output features per program (power of two; >= 16 with use_dot).
    block_kb:  packed bytes per row per loop step (power of two >= 16): 2 * block_kb elements of K.
    split_k:   K ranges computed by separate programs (1: no partials, one launch).
    use_dot:   tensor-core dot on x padded to 16 rows (16-bit x only), else fp32 FMAs.
    num_warps: warps per program.
    """

    block_n: int = 32
    block_kb: int = 128
    split_k: int = 1
    use_dot: bool = False
    num_warps: int = 4


def default_config(rows: int, n: int, k: int, dtype: torch.dtype, device: torch.device) -> GemvConfig:
    """The launch used when none is given: FMA for 1-2 rows (and fp32), the dot for 3-8 rows.

    On a GPU, K is split until the grid holds about two programs per SM (at most 16 ranges, and
    no range shorter than one loop step). Under the interpreter programs run one after another, so
    nothing is split.
    """
    use_dot = rows > 2 and dtype in (torch.float16, torch.bfloat16)
    if device.type != "cuda":
        return GemvConfig(use_dot=use_dot)
    # The FMA path keeps a [rows, block_n, block_kb] fp32 accumulator, reduced once after the
    # loop: past one row a smaller tile keeps it within 64 registers per thread (8 rows, 4 warps).
    block_n, block_kb = (32, 128) if use_dot or rows == 1 else (16, 64)
    tiles = triton.cdiv(n, block_n)
    steps = triton.cdiv(k, 2 * block_kb)
    index = device.index if device.index is not None else torch.cuda.current_device()
    split = 1
    while tiles * split < 2 * _num_sms(index) and split * 2 <= min(16, steps):
        split *= 2
    return GemvConfig(block_n, block_kb, split, use_dot)


@triton.jit
def _nf4_matmul_kernel(
    x_ptr,  # [M, K] (unit stride along K)
    packed_ptr,  # [N * K / 2] uint8, row-major W: row n's bytes at n * K / 2
    code_ptr,  # [16] fp32
    absmax_ptr,  # [N * K / BLOCKSIZE] fp32, or uint8 when NESTED
    code2_ptr,  # [256] fp32 (NESTED only)
    absmax2_ptr,  # [ceil(n_blocks / BLOCKSIZE2)] fp32 (NESTED only)
    offset_ptr,  # [1] fp32 (NESTED only)
    bias_ptr,  # [N] (HAS_BIAS only)
    out_ptr,  # [M, N] x's dtype when SPLIT_K == 1, else the fp32 partials [SPLIT_K, M, N]
    M, N, K,
    stride_xm, stride_om,
    k_per_split,  # elements of K per program along axis 1: a multiple of 2 * BLOCK_KB
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SUB: tl.constexpr,  # bytes per row sharing one absmax within a step: min(BLOCKSIZE / 2, BLOCK_KB)
    NB: tl.constexpr,  # absmax blocks per row per step: BLOCK_KB / SUB
    SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_FP32: tl.constexpr,  # interpreter: its 16-bit dots are wrong, so the dot runs on fp32 copies
    ROUND_BF16: tl.constexpr,
):
    BLOCK_KB: tl.constexpr = NB * SUB
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rn64 = rn.to(tl.int64)
    rm = tl.arange(0, BLOCK_M)
    m_ok = rm < M
    sub = tl.arange(0, NB)
    j = tl.arange(0, SUB)
    kk = tl.arange(0, BLOCK_KB)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_KB), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, 2 * BLOCK_KB):
        # K and every range bound are multiples of BLOCKSIZE (hence of 2 * SUB): a sub-block lies
        # wholly inside or outside, so masks and absmax are per [row, sub-block].
        sub_k = k0 + 2 * SUB * sub  # [NB] first element of each sub-block
        ok2 = n_ok[:, None] & (sub_k < k_hi)[None, :]  # [BLOCK_N, NB]
        ok3 = ok2[:, :, None] & (j < SUB)[None, None, :]  # [BLOCK_N, NB, SUB]
        byte = rn64[:, None, None] * (K // 2) + (sub_k // 2)[None, :, None] + j[None, None, :]
        packed = tl.load(packed_ptr + byte, mask=ok3, other=0).to(tl.int32)
        block = (rn64[:, None] * K + sub_k[None, :]) // BLOCKSIZE  # [BLOCK_N, NB]
        scale = block_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, block, ok2, BLOCKSIZE2, NESTED)
        # Masked codes read code[0] and masked x reads 0, so out-of-range products vanish.
        hi = tl.reshape(tl.load(code_ptr + (packed >> 4)) * scale[:, :, None], (BLOCK_N, BLOCK_KB))
        lo = tl.reshape(tl.load(code_ptr + (packed & 15)) * scale[:, :, None], (BLOCK_N, BLOCK_KB))
        xk = k0 + 2 * kk  # [BLOCK_KB] the even columns; hi multiplies them, lo the next (odd) ones
        x_ok = m_ok[:, None] & (xk < k_hi)[None, :]
        x_even = tl.load(x_ptr + rm[:, None] * stride_xm + xk[None, :], mask=x_ok, other=0.0)
        x_odd = tl.load(x_ptr + rm[:, None] * stride_xm + xk[None, :] + 1, mask=x_ok, other=0.0)
        if USE_DOT:
            w_ty = x_ptr.dtype.element_ty
            if DOT_FP32:
                hi = round_bf16_rtne(hi, ROUND_BF16).to(w_ty).to(tl.float32)
                lo = round_bf16_rtne(lo, ROUND_BF16).to(w_ty).to(tl.float32)
                x_even = x_even.to(tl.float32)
                x_odd = x_odd.to(tl.float32)
            else:
                hi = hi.to(w_ty)
                lo = lo.to(w_ty)
            acc = tl.dot(x_even, tl.trans(hi), acc)
            acc = tl.dot(x_odd, tl.trans(lo), acc)
        else:
            acc += x_even.to(tl.float32)[:, None, :] * hi[None, :, :]
            acc += x_odd.to(tl.float32)[:, None, :] * lo[None, :, :]
    if not USE_DOT:
        acc = tl.sum(acc, axis=2)
    out_ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = round_bf16_rtne(acc, ROUND_BF16).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], out, mask=out_ok)
    else:
        partial = out_ptr + pid_k.to(tl.int64) * M * N
        tl.store(partial + rm[:, None] * N + rn[None, :], acc, mask=out_ok)


@triton.jit
def _split_k_sum_kernel(
    partial_ptr,  # [SPLIT_K, M * N] fp32
    bias_ptr,  # [N] (HAS_BIAS only)
    out_ptr,  # [M, N] with row stride stride_om
    M, N, stride_om,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M * N
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):  # a fixed order: the same sum on every replay
        total += tl.load(partial_ptr + s * M * N + offs, mask=ok, other=0.0)
    row = offs // N
    col = offs % N
    if HAS_BIAS:
        total += tl.load(bias_ptr + col, mask=ok, other=0.0).to(tl.float32)
    out = round_bf16_rtne(total, ROUND_BF16).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_om + col, out, mask=ok)


def nf4_matmul_unsupported(quant_state, in_features: int | None = None) -> str | None:
    """Why nf4_matmul cannot read this weight (None: it can).

    It reads a 2D [out, in] weight whose rows are whole absmax blocks (in % blocksize == 0, true of
    every LLM projection) with a power-of-two blocksize, in bitsandbytes' standard layout.
    """
    if quant_state is None:
        return "the weight is not 4-bit (no quant_state)"
    if getattr(quant_state, "packing_format_for_cpu", False):
        return "bitsandbytes repacked this weight for its CPU kernel (packing_format_for_cpu)"
    shape = tuple(quant_state.shape)
    if len(shape) != 2:
        return f"quant_state.shape {shape} is not a 2D [out, in] weight"
    blocksize = int(quant_state.blocksize)
    if blocksize < 2 or blocksize & (blocksize - 1):
        return f"quant_state.blocksize {blocksize} is not a power of two"
    if shape[1] % blocksize:
        return f"in_features {shape[1]} is not a multiple of the blocksize {blocksize}"
    if in_features is not None and in_features != shape[1]:
        return f"x has {in_features} features but the weight takes {shape[1]}"
    return None


def nf4_matmul(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    quant_state,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """y = x @ dequant(W)^T + bias for a few rows of x, the NF4 weight read packed once.

    x:             [..., K] fp32 / fp16 / bf16, at most MAX_ROWS (8) rows once flattened.
    weight_packed: the `Params4bit` data of W: [N * K / 2, 1] (any quant_storage dtype).
    quant_state:   its bitsandbytes QuantState; quant_state.shape == (N, K), nested or not.
    bias:          [N] or None.
    config:        launch choice (tests and bench/kernels.py); None picks `default_config`.
    Returns y: [..., N] in x's dtype, accumulated in fp32. Capturable in a CUDA graph.
    """
    reason = nf4_matmul_unsupported(quant_state, x.shape[-1])
    if reason:
        raise ValueError(f"nf4_matmul cannot read this weight: {reason}")
    check_float("x", x)
    n, k = (int(d) for d in quant_state.shape)
    x2 = rows_view(x)
    rows = x2.shape[0]
    if rows > MAX_ROWS:
        raise ValueError(f"nf4_matmul takes at most {MAX_ROWS} rows of x, got {rows}; use dequantize_nf4 and a matmul")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    config = config or default_config(rows, n, k, x.dtype, x.device)
    if config.use_dot and x.dtype == torch.float32:
        raise ValueError("the dot path takes 16-bit x only (an fp32 dot would round through tf32)")
    packed, _, code, absmax, code2, absmax2, offset, blocksize2 = _launch_args(weight_packed, quant_state)
    if packed.device != x.device:
        raise ValueError(f"x is on {x.device} but the weight is on {packed.device}")
    # Allocated in its final shape (not a view of a 2D result) so callers may modify it in place.
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    out2 = out.view(rows, n)
    blocksize = int(quant_state.blocksize)
    sub = min(blocksize // 2, config.block_kb)
    step = 2 * config.block_kb
    k_per_split = triton.cdiv(triton.cdiv(k, step), config.split_k) * step
    split = triton.cdiv(k, k_per_split)
    target = out2 if split == 1 else torch.empty((split, rows, n), dtype=torch.float32, device=x.device)
    round_bf16 = needs_bf16_rounding(x.dtype)
    has_bias = bias is not None
    launch(_nf4_matmul_kernel, (triton.cdiv(n, config.block_n), split),
        x2, packed, code, absmax, code2, absmax2, offset, bias if has_bias else code, target,
        rows, n, k, x2.stride(0), out2.stride(0), k_per_split,
        BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2, NESTED=bool(quant_state.nested), HAS_BIAS=has_bias,
        BLOCK_M=_DOT_ROWS if config.use_dot else triton.next_power_of_2(rows), BLOCK_N=config.block_n,
        SUB=sub, NB=config.block_kb // sub, SPLIT_K=split, USE_DOT=config.use_dot,
        DOT_FP32=TRITON_INTERPRETER, ROUND_BF16=round_bf16, num_warps=config.num_warps,
    )
    if split > 1:
        block = 1024
        launch(_split_k_sum_kernel, (triton.cdiv(rows * n, block),),
            target, bias if has_bias else code, out2, rows, n, out2.stride(0),
            SPLIT_K=split, HAS_BIAS=has_bias, ROUND_BF16=round_bf16, BLOCK=block, num_warps=4,
        )
    return out


def reference_nf4_matmul(x: torch.Tensor, weight_packed: torch.Tensor, quant_state, bias: torch.Tensor | None = None):
    """`nf4_matmul` in plain PyTorch: W dequantised in fp32, x @ W^T + bias in fp32, cast to x's dtype.

    x: [..., K]; returns [..., N]. No row limit.
    """
    w = reference_dequantize_nf4(weight_packed, quant_state, torch.float32)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
