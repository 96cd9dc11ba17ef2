"""Shared helpers for the Triton kernels: launch sizes, row views, device checks, dtype rounding.

Launch sizes are picked by small heuristics instead of `triton.autotune`: autotuning many configs
is slow under the CPU interpreter (every config is run) and the memory-bound kernels here reach
bandwidth with the obvious choices anyway.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from tuneforge.kernels.launcher import launch
from tuneforge.switches import TRITON_INTERPRETER

# A row-wise kernel keeps one whole row in registers; beyond this many elements it would spill
# (65536 fp32 values is already 256 KiB per program). No supported family comes near it.
MAX_ROW_BLOCK = 65536


def row_launch(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a kernel that loads a whole row of `n_cols` elements at once.

    BLOCK is the next power of two (Triton block shapes must be powers of two; the tail is
    masked). More warps for longer rows keep each thread's share of the row small enough for
    registers: about 8-16 fp32 values per thread.
    """
    block = triton.next_power_of_2(n_cols)
    if block > MAX_ROW_BLOCK:
        raise ValueError(
            f"row length {n_cols} is above the {MAX_ROW_BLOCK} elements a row-wise kernel can "
            "hold in registers; use the reference_* function for such shapes"
        )
    if block >= 16384:
        num_warps = 16
    elif block >= 4096:
        num_warps = 8
    elif block >= 1024:
        num_warps = 4
    else:
        num_warps = 2
    return block, num_warps


# A forward norm program should move at least this many elements: with hidden 576 (block 1024)
# one row per program reaches 2.6 TB/s on an H100, four rows per program 3.5 TB/s.
TILE_ELEMENTS = 4096


def row_tile_launch(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK, ROWS, num_warps) for a forward norm that loads a [ROWS, BLOCK] tile of rows at once.

    Long rows (>= TILE_ELEMENTS) go one per program, like `row_launch`; short rows are stacked
    until the tile holds TILE_ELEMENTS, where 4 warps measured best.
    """
    block, num_warps = row_launch(n_cols)
    rows = max(1, TILE_ELEMENTS // block)
    return block, rows, (4 if rows > 1 else num_warps)


def elementwise_launch(numel: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a flat elementwise kernel over `numel` elements.

    Large tensors get 4096-element blocks (16 elements per thread with 8 warps: wide, vectorised
    loads and few programs); small ones 1024 so that a short tensor still spreads over the SMs.
    """
    if numel >= 1 << 20:
        return 4096, 8
    return 1024, 4


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """`x: [..., n]` as `[rows, n]` with unit stride along the last dim (a view when possible).

    The kernels take a row stride, so a row-strided view (e.g. a slice of a larger buffer) is
    not copied; only a tensor whose last dim is itself strided is made contiguous.
    """
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    return x2d


def flat(x: torch.Tensor) -> torch.Tensor:
    """`x` as a contiguous 1D tensor (a view when `x` is already contiguous)."""
    return x.contiguous().view(-1)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_programs_for_rows(n_rows: int, device: torch.device, block: int) -> int:
    """How many programs a row-blocked backward should launch (each accumulates a partial dW).

    On a GPU: a few per SM, so every SM is busy while the partial sums stay small
    ([programs, hidden] fp32); short rows (block <= 1024) want more programs in flight (H100,
    hidden 576: 2.1 TB/s with 8 per SM against 1.6 with 4; hidden >= 4096 is best with 4).
    Under the interpreter programs run one after another, so fewer and longer programs only
    save Python overhead.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        per_sm = 8 if block <= 1024 else 4
        return max(1, min(n_rows, per_sm * _num_sms(index)))
    return max(1, min(n_rows, 4))


def check_device(*tensors: torch.Tensor) -> None:
    """Raise a clear error when a kernel cannot run on these tensors.

    Triton compiles for CUDA; CPU tensors work only under its interpreter (TRITON_INTERPRET=1,
    set before triton is imported). Without it, Triton would fail deep inside with a pointer
    error, so say what to do instead.
    """
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"kernel inputs are on different devices: {device} and {t.device}")
    if device.type == "cuda":
        return
    if device.type == "cpu" and TRITON_INTERPRETER:
        return
    raise RuntimeError(
        f"Triton kernels need CUDA tensors (got {device}); on CPU set TRITON_INTERPRET=1 before "
        "importing triton, or call the reference_* function of this op"
    )


# Triton's CPU interpreter converts fp32 -> bf16 by truncation, where a GPU rounds to nearest
# even; kernels that store bf16 round the value themselves under the interpreter, so the CPU
# tests see the GPU's exact numbers.
def needs_bf16_rounding(dtype: torch.dtype) -> bool:
    """The ROUND_BF16 constexpr for a kernel that stores `dtype`."""
    return TRITON_INTERPRETER and dtype == torch.bfloat16


@triton.jit
def round_bf16_rtne(x, ROUND_BF16: tl.constexpr):
    """fp32 x rounded to the nearest-even bf16 value (still fp32) when ROUND_BF16; else x.

    Adds half an ulp of bf16 (minus one when the kept bit is even) to the raw bits and clears
    the 16 dropped bits, so the later truncating conversion is exact. Finite values only.
    """
    if ROUND_BF16:
        u = x.to(tl.uint32, bitcast=True)
        u = u + (0x7FFF + ((u >> 16) & 1))
        x = ((u >> 16) << 16).to(tl.float32, bitcast=True)
    return x


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype torch.autocast computes matmuls in on `device`'s type, or None when it is off.

    The fused ops cast their inputs to it once and run with autocast off, so that every matmul
    of the forward and the hand-written backward agrees on one dtype (autocast would otherwise
    recast inside the forward only, leaving the backward with mixed dtypes).
    """
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def call_in_autocast_dtype(fn, x: torch.Tensor, *args):
    """fn(x, *args) after checking x's device; under torch.autocast, x is cast to its dtype and
    autocast is off inside (see `autocast_dtype`)."""
    check_device(x)
    cast = autocast_dtype(x.device)
    if cast is None:
        return fn(x, *args)
    with torch.autocast(x.device.type, enabled=False):
        return fn(x.to(cast), *args)


def check_float(name: str, t: torch.Tensor) -> None:
    """Kernels accept fp32, fp16 and bf16 tensors; say which input is wrong otherwise."""
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_row_param(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    """A per-feature parameter of a row-wise op (norm weight/bias) must be `[hidden]` for `x: [..., hidden]`."""
    check_float(name, t)
    if t.shape != (x.shape[-1],):
        raise ValueError(
            f"{name} must have shape ({x.shape[-1]},) for x of shape {tuple(x.shape)}, got {tuple(t.shape)}"
        )


def check_gate_up(gate: torch.Tensor, up: torch.Tensor) -> None:
    """Gated-MLP inputs (gate_proj and up_proj outputs) must match in shape, dtype and device."""
    check_device(gate, up)
    check_float("gate", gate)
    check_float("up", up)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(
            f"gate and up must have the same shape and dtype, got {tuple(gate.shape)} {gate.dtype} "
            f"and {tuple(up.shape)} {up.dtype}"
        )


def gated_forward(kernel, gate: torch.Tensor, up: torch.Tensor, **constexprs):
    """Run a flat elementwise `kernel(GATE, UP, OUT, n, BLOCK, **constexprs)` over gate/up.

    Returns (out shaped like gate, flat gate, flat up); the flat inputs are what the backward needs.
    """
    check_gate_up(gate, up)
    gate_f, up_f = flat(gate), flat(up)
    out = torch.empty_like(gate_f)
    n = gate_f.numel()
    block, num_warps = elementwise_launch(n)
    if n:
        launch(kernel, (triton.cdiv(n, block),), gate_f, up_f, out, n, BLOCK=block, num_warps=num_warps,
               **constexprs)
    return out.view(gate.shape), gate_f, up_f


def gated_backward(kernel, dout: torch.Tensor, gate_f: torch.Tensor, up_f: torch.Tensor, shape, **constexprs):
    """Run `kernel(DOUT, GATE, UP, DGATE, DUP, n, BLOCK, **constexprs)`; returns (dgate, dup) in `shape`."""
    dout_f = flat(dout)
    dgate, dup = torch.empty_like(gate_f), torch.empty_like(up_f)
    n = gate_f.numel()
    block, num_warps = elementwise_launch(n)
    if n:
        launch(kernel, (triton.cdiv(n, block),), dout_f, gate_f, up_f, dgate, dup, n, BLOCK=block,
               num_warps=num_warps, **constexprs)
    return dgate.view(shape), dup.view(shape)


def param_grad_partials(programs: int, hidden: int, device: torch.device, needed: bool) -> torch.Tensor:
    """fp32 buffer `[programs, hidden]` for per-program partial sums of a norm's dW or dB.

    When the parameter is frozen (`needed` False) the kernel writes nothing, so a 1-element
    placeholder stands in for the pointer.
    """
    return torch.empty((programs, hidden) if needed else (1,), dtype=torch.float32, device=device)


def reduce_param_grad(partials: torch.Tensor, needed: bool, n_rows: int, hidden: int, dtype: torch.dtype):
    """Sum the per-program partials into the parameter's gradient (None when it is frozen)."""
    if not needed:
        return None
    if n_rows == 0:
        return torch.zeros(hidden, dtype=dtype, device=partials.device)
    return partials.sum(0).to(dtype)
