"""NF4 (bitsandbytes 4-bit) dequantisation in one Triton pass, and the dense weight of (weight, quant_state).

bitsandbytes stores a `Params4bit` weight of logical shape `quant_state.shape` as:
- packed codes: the flattened weight, two 4-bit codes per byte, the first element in the HIGH
  nibble (storage may be any dtype of the same bytes: `quant_storage`);
- per block of `blocksize` (64) consecutive flattened elements a fp32 absmax, or with double
  quantisation (`compress_statistics=True`, "nested") a uint8 code into `state2.code` (the 8-bit
  dynamic map) scaled by a fp32 `state2.absmax` per `state2.blocksize` (256) blocks, plus the
  scalar `offset` (the mean subtracted before the second quantisation);
- `quant_state.code`: the 16 values of the 4-bit data type (NF4, or FP4 which reads the same way).

    absmax[b] = state2.code[qabsmax[b]] * state2.absmax[b // 256] + offset     (fp32)
    W[i]      = code[nibble(i)] * absmax[i // blocksize]                       (fp32, then out dtype)

bitsandbytes itself first materialises the whole fp32 absmax vector and then runs a second
kernel; here both happen in the one kernel that writes W, so W is read-once/write-once.
The arithmetic is done in fp32 in the same order as bitsandbytes, so the result is bit-identical
(or within one rounding of the out dtype where a GPU fuses the multiply-add).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tuneforge.kernels._utils import check_device, needs_bf16_rounding, round_bf16_rtne
from tuneforge.kernels.launcher import launch

__all__ = ["block_absmax", "dense_weight", "dequantize_nf4", "dequantize_nf4_rows", "reference_dequantize_nf4"]


@triton.jit
def block_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, block, mask, BLOCKSIZE2: tl.constexpr,
                 NESTED: tl.constexpr):
    """fp32 absmax of the blocks `block` (any shape; masked ones read 0, or the offset when NESTED).

    NESTED: state2.code[qabsmax] * state2.absmax[block // BLOCKSIZE2] + offset, the product rounded
    before the add as bitsandbytes does (kernels launch with enable_fp_fusion=False for that).
    """
    # One return at the end: Triton 3.6's compiler rejects a return inside an `if` followed by
    # another (the CPU interpreter accepts it, so only the GPU run showed it).
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=mask, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


@triton.jit
def _dequantize_block(
    packed_ptr,  # [ceil(n / 2)] uint8: two codes per byte, first element in the high nibble
    code_ptr,  # [16] fp32: the 4-bit data type's values
    absmax_ptr,  # [n_blocks] fp32, or uint8 when NESTED
    code2_ptr,  # [256] fp32: state2.code (NESTED only)
    absmax2_ptr,  # [ceil(n_blocks / blocksize2)] fp32 (NESTED only)
    offset_ptr,  # [1] fp32 (NESTED only)
    out_ptr,  # [n] out dtype
    n,
    pid,  # which BLOCK of bytes
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    BLOCK: tl.constexpr,  # bytes per program
    ROUND_BF16: tl.constexpr,
):
    byte = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    first = 2 * byte  # flattened index of the high-nibble element
    ok_hi = first < n
    packed = tl.load(packed_ptr + byte, mask=ok_hi, other=0).to(tl.int32)
    # Both elements of a byte lie in one block: blocksize is even.
    scale = block_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, first // BLOCKSIZE, ok_hi, BLOCKSIZE2, NESTED)
    hi = tl.load(code_ptr + (packed >> 4)) * scale
    lo = tl.load(code_ptr + (packed & 15)) * scale
    out_ty = out_ptr.dtype.element_ty
    hi = round_bf16_rtne(hi, ROUND_BF16).to(out_ty)
    lo = round_bf16_rtne(lo, ROUND_BF16).to(out_ty)
    # One contiguous store of the interleaved pairs: ~25% faster on H100 than two stride-2
    # stores (67 vs 85 us for a 14336x4096 bf16 weight; bitsandbytes: 102 us).
    out_offs = pid.to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + out_offs, tl.interleave(hi, lo), mask=out_offs < n)


@triton.jit
def _dequantize_nf4_kernel(
    packed_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr, n,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, BLOCK: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    _dequantize_block(packed_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr, n,
                      tl.program_id(0), BLOCKSIZE, BLOCKSIZE2, NESTED, BLOCK, ROUND_BF16)


@triton.jit
def _dequantize_nf4_segments_kernel(
    code_ptr,  # [16] fp32, shared: the segments have one quant_type
    p0, a0, c0, m0, o0, out0, n0,  # segment 0: packed, absmax, state2 code, state2 absmax, offset, out, n
    p1, a1, c1, m1, o1, out1, n1,
    p2, a2, c2, m2, o2, out2, n2,  # a copy of segment 1 when there are two (never reached)
    programs0, programs01,  # programs of segment 0, and of segments 0 and 1
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, BLOCK: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    # Two or three weights (Q|K|V, gate|up) in one launch, each program in one of them: the
    # launch, not the work, is what costs on a step bound by launching kernels.
    pid = tl.program_id(0)
    if pid < programs0:
        _dequantize_block(p0, code_ptr, a0, c0, m0, o0, out0, n0, pid, BLOCKSIZE, BLOCKSIZE2, NESTED, BLOCK, ROUND_BF16)
    elif pid < programs01:
        _dequantize_block(p1, code_ptr, a1, c1, m1, o1, out1, n1, pid - programs0, BLOCKSIZE, BLOCKSIZE2, NESTED,
                          BLOCK, ROUND_BF16)
    else:
        _dequantize_block(p2, code_ptr, a2, c2, m2, o2, out2, n2, pid - programs01, BLOCKSIZE, BLOCKSIZE2, NESTED,
                          BLOCK, ROUND_BF16)


def _state_parts(weight_packed: torch.Tensor, quant_state):
    """(packed uint8 [ceil(n/2)], n, code [16] fp32) after checking the state is one we read."""
    if quant_state is None:
        raise ValueError("this weight has no quant_state: it was never quantised (move it to a device first)")
    if quant_state.code is None or quant_state.code.numel() != 16:
        raise ValueError(
            f"quant_state.code must hold the 16 values of a 4-bit type (quant_type "
            f"{quant_state.quant_type!r}); got {None if quant_state.code is None else quant_state.code.numel()}"
        )
    if quant_state.blocksize % 2:
        raise ValueError(f"quant_state.blocksize must be even, got {quant_state.blocksize}")
    if getattr(quant_state, "packing_format_for_cpu", False):
        raise ValueError("this weight is in bitsandbytes' CPU-repacked layout (packing_format_for_cpu), not the "
                         "standard one: call tuneforge.integration.bnb.standard_layout(model) first")
    n = 1
    for d in quant_state.shape:
        n *= int(d)
    # quant_storage may be e.g. bf16 for FSDP: the bytes are the same, only the view differs.
    packed = weight_packed.detach().contiguous().view(torch.uint8).reshape(-1)
    if packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"packed weight holds {packed.numel()} bytes but quant_state.shape {tuple(quant_state.shape)} "
            f"needs {(n + 1) // 2}"
        )
    return packed, n, quant_state.code.to(device=packed.device, dtype=torch.float32)


def _launch_args(weight_packed: torch.Tensor, quant_state):
    """The kernel's tensor arguments for this weight, checked and converted once, then cached on
    the QuantState: a training step dequantises every weight three times (forward, recompute,
    backward), and redoing the checks and small dtype/device conversions each time cost more CPU
    time than the kernel takes on the GPU (8B shape: 672 calls a step)."""
    key = (weight_packed.data_ptr(), weight_packed.device)
    cached = getattr(quant_state, "_tuneforge_launch_args", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    packed, n, code = _state_parts(weight_packed, quant_state)
    check_device(packed)
    device = packed.device
    if quant_state.nested:
        s2 = quant_state.state2
        absmax = quant_state.absmax.to(device)
        code2 = s2.code.to(device=device, dtype=torch.float32)
        absmax2 = s2.absmax.to(device=device, dtype=torch.float32)
        offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=device).reshape(1)
        blocksize2 = s2.blocksize
    else:
        absmax = quant_state.absmax.to(device=device, dtype=torch.float32)
        code2 = absmax2 = offset = absmax  # unused placeholders: NESTED=False never reads them
        blocksize2 = 1
    args = (packed, n, code, absmax, code2, absmax2, offset, blocksize2)
    quant_state._tuneforge_launch_args = (key, args)
    return args


def dequantize_nf4(weight_packed: torch.Tensor, quant_state, out_dtype: torch.dtype | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense weight of a bitsandbytes 4-bit tensor.

    weight_packed: the `Params4bit` data, [ceil(n / 2), 1] (any quant_storage dtype).
    quant_state:   its `bitsandbytes.functional.QuantState` (nested or not).
    out_dtype:     default quant_state.dtype (the dtype the weight had before quantisation).
    out:           optional contiguous quant_state.shape tensor to write into (e.g. the rows of a
                   larger buffer holding several weights); its dtype is the output dtype.
    Returns W: quant_state.shape, out_dtype, on weight_packed's device.
    """
    packed, n, code, absmax, code2, absmax2, offset, blocksize2 = _launch_args(weight_packed, quant_state)
    device = packed.device
    if out is None:
        out_dtype = out_dtype or quant_state.dtype
        out = torch.empty(tuple(quant_state.shape), dtype=out_dtype, device=device)
    else:
        out_dtype = out.dtype
        if tuple(out.shape) != tuple(quant_state.shape) or not out.is_contiguous() or out.device != device:
            raise ValueError(f"out must be a contiguous {tuple(quant_state.shape)} tensor on {device}, "
                             f"got {tuple(out.shape)} (contiguous: {out.is_contiguous()}) on {out.device}")
    if n == 0:
        return out
    block, extra = _launch_config(device)
    grid = (triton.cdiv(packed.numel(), block),)
    launch(_dequantize_nf4_kernel, grid,
        packed, code, absmax, code2, absmax2, offset, out, n,
        BLOCKSIZE=quant_state.blocksize, BLOCKSIZE2=blocksize2, NESTED=bool(quant_state.nested),
        BLOCK=block, ROUND_BF16=needs_bf16_rounding(out_dtype), **extra,
    )
    return out


def _launch_config(device: torch.device) -> tuple[int, dict]:
    """(bytes per program, launch options) of the dequantisation kernels on `device`."""
    if device.type != "cuda":
        return 4096, {}
    # No fused multiply-add on the GPU: bitsandbytes rounds the product before adding the offset.
    return 2048, {"num_warps": 4, "enable_fp_fusion": False}


def _check_out_rows(shapes: list[tuple], out: torch.Tensor) -> None:
    if (any(len(shape) != 2 for shape in shapes) or len({shape[1] for shape in shapes}) != 1
            or not out.is_contiguous() or tuple(out.shape) != (sum(shape[0] for shape in shapes), shapes[0][1])):
        raise ValueError(f"out must be a contiguous [{sum(shape[0] for shape in shapes)}, in] tensor for weights "
                         f"of shapes {shapes} with one input size, got {tuple(out.shape)}")


def dequantize_nf4_rows(weights: list[tuple[torch.Tensor, object]], out: torch.Tensor) -> torch.Tensor:
    """Several 4-bit weights [n_j, in] dequantised into consecutive row blocks of `out` [sum n_j, in].

    weights: (packed data, QuantState) pairs, as for `dequantize_nf4`. Two or three non-empty
    weights of one quant_type, blocksize and nesting go through one launch
    (`_dequantize_nf4_segments_kernel`); other sets are dequantised one by one into their rows.
    Bit-identical to `dequantize_nf4` each.
    """
    shapes = [tuple(int(d) for d in qs.shape) for _, qs in weights]
    _check_out_rows(shapes, out)
    views = out.split([shape[0] for shape in shapes])
    args = [_launch_args(packed, qs) for packed, qs in weights]  # [7]: state2's blocksize
    kinds = {(qs.quant_type, qs.blocksize, bool(qs.nested), a[7]) for (_, qs), a in zip(weights, args)}
    if not (2 <= len(weights) <= 3 and len(kinds) == 1 and all(view.numel() for view in views)):
        for (packed, qs), view in zip(weights, views):
            dequantize_nf4(packed, qs, out=view)
        return out
    check_device(out)
    block, extra = _launch_config(out.device)
    programs = [triton.cdiv(a[0].numel(), block) for a in args]
    segments = []
    for (packed, n, _, absmax, code2, absmax2, offset, _), view in zip(args, views):
        segments += [packed, absmax, code2, absmax2, offset, view, n]
    if len(args) == 2:
        segments += segments[7:]
    state = weights[0][1]
    launch(_dequantize_nf4_segments_kernel, (sum(programs),),
        args[0][2], *segments, programs[0], programs[0] + programs[1],
        BLOCKSIZE=state.blocksize, BLOCKSIZE2=args[0][7], NESTED=bool(state.nested),
        BLOCK=block, ROUND_BF16=needs_bf16_rounding(out.dtype), **extra,
    )
    return out


def reference_dequantize_nf4(weight_packed: torch.Tensor, quant_state, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`dequantize_nf4` in plain PyTorch (no bitsandbytes call): same arguments, same result."""
    packed, n, code = _state_parts(weight_packed, quant_state)
    device = packed.device
    if quant_state.nested:
        s2 = quant_state.state2
        q = quant_state.absmax.to(device).long()
        idx2 = torch.arange(q.numel(), device=device) // s2.blocksize
        absmax = s2.code.to(device).float()[q] * s2.absmax.to(device).float()[idx2]
        absmax = absmax + torch.as_tensor(quant_state.offset, dtype=torch.float32, device=device)
    else:
        absmax = quant_state.absmax.to(device).float()
    codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:n].long()
    block_of = torch.arange(n, device=device) // quant_state.blocksize
    w = code[codes] * absmax[block_of]
    return w.to(out_dtype or quant_state.dtype).reshape(tuple(quant_state.shape))


def dense_weight(weight: torch.Tensor, quant_state, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[out, in] in `dtype`: dequantised when quant_state is given, else weight itself (cast if asked)."""
    if quant_state is not None:
        return dequantize_nf4(weight, quant_state, dtype)
    return weight if dtype is None or weight.dtype == dtype else weight.to(dtype)
