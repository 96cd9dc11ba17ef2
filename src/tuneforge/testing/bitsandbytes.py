"""bitsandbytes as a test oracle that holds on any CPU.

bitsandbytes' AVX512 CPU `dequantize_4bit` assumes whole blocks per row: for a [out, in] weight with
in % 16 == 0 and in % blocksize != 0 (64 x 176, 96 x 80, a tiny Llama's down_proj) it differs from
the NF4 formula by up to ~2, and every `Linear4bit` forward and backward dequantises through it
(see tuneforge.integration.bnb). Tests that take bitsandbytes as the reference on such shapes use
these two instead, so they check tuneforge, not the CPU they run on.
"""

from __future__ import annotations

import torch


def bitsandbytes_dequantize(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit of (packed, quant_state); where its CPU kernel is wrong for the
    shape, bitsandbytes' own generic PyTorch implementation (the one it falls back to for odd
    shapes), so the oracle stays bitsandbytes' arithmetic and independent of tuneforge's."""
    import bitsandbytes.functional as bnbf

    from tuneforge.integration.bnb import cpu_dequantize_exact

    rows_whole = int(quant_state.shape[-1]) % int(quant_state.blocksize) == 0
    if packed.device.type != "cpu" or rows_whole or cpu_dequantize_exact():
        return bnbf.dequantize_4bit(packed, quant_state)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = quant_state.absmax
    if quant_state.nested:
        absmax = bnbf.dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset
    data = packed.view(torch.uint8).reshape(-1)
    return _dequantize_4bit_compute(data, absmax.float(), quant_state.code, quant_state.blocksize,
                                    tuple(quant_state.shape), quant_state.dtype)


def exact_on_this_cpu(model: torch.nn.Module) -> torch.nn.Module:
    """Make every bitsandbytes Linear4bit in `model` (a layer, or a whole model built without
    tuneforge's loader) a reference that is right on this CPU, as tuneforge's loader does
    (`integration.bnb.prepare`): no in-place CPU repack in eval mode (bitsandbytes would then
    multiply in bf16, and assert on 176-row weights), and, for a shape its CPU dequantisation gets
    wrong, the NF4 formula. Elsewhere bitsandbytes' own forward runs unchanged. Returns `model`."""
    from tuneforge.integration.bnb import prepare

    prepare(model)
    return model
