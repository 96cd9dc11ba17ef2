"""bitsandbytes glue: its CPU repack and its CPU dequantisation, handled in this one place.

Facts (bitsandbytes 0.48-0.50, read in its source):

- **The CPU repack.** `Linear4bit.forward` on a CPU where bitsandbytes finds AVX512-BF16
  (`functional.has_avx512bf16()`, copied into each layer as `support_avx512bf16_for_cpu` when it is
  built), in eval mode, with an input that does not require grad, rewrites its weight IN PLACE
  for its CPU gemm (`functional._convert_weight_packed_for_cpu`): the nibbles are reordered in
  tiles of 32 rows, the block scales (absmax, double-quantised or not) are dequantised, rounded to
  bf16 and transposed, `quant_state.nested` becomes False, `quant_state.dtype` bf16, and
  `quant_state.packing_format_for_cpu` True. From then on `weight.data` and `quant_state` are not
  bitsandbytes' standard layout: everything that reads them as such (merges, GGUF, our NF4
  dequantisation and fused kernels, FSDP2) reads garbage, without an error.
- **Its inverse is not exact.** `_convert_weight_packed_for_cpu_inverse` (which bitsandbytes calls
  itself in `_save_to_state_dict` and `.cuda()`) restores the nibbles exactly, but re-quantises
  the bf16-rounded scales of a double-quantised weight with a new offset (a weight then differs
  from what was loaded) and leaves a single-quantised weight's scales transposed in bf16.
- **Its CPU dequantisation is wrong when a row is not whole blocks.** On AVX512 CPUs,
  `dequantize_4bit` of a [out, in] weight with in % 16 == 0 but in % blocksize != 0 (64 x 176,
  96 x 80) differs from the NF4 formula by up to ~2; its vectorised kernel assumes whole blocks per
  row. `matmul_4bit` (every Linear4bit forward and backward) dequantises through it.

Policy (measured on a 2-core AVX512-BF16 Xeon, SmolLM2-135M NF4, one thread: the repacked gemm
takes 0.42-0.70 s for a 256-token prefill and 0.75-1.2 s for 32 greedy tokens, the standard path
0.80 s and 1.5 s, so the repack is kept for inference):

- Loading and training never repack (`prepare`, `prevent_cpu_repack`): training only reads.
- `for_inference` allows it (`allow_cpu_repack`) and first keeps the standard block scales on
  the side (a reference, ~1/64 byte per weight): `standard_layout` then restores the weight bit for
  bit, so an export after generating equals one without.
- Every reader of weight data calls `standard_layout` (or `dequantize_4bit`, which does) first.
- A layer whose CPU dequantisation bitsandbytes gets wrong is multiplied through the NF4 formula
  instead (`linear4bit_forward`); `dequantize_4bit` does the same.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys

import torch

log = logging.getLogger(__name__)

# The standard block scales kept on a QuantState before bitsandbytes may repack it:
# (absmax, state2, offset, nested, dtype), the objects themselves (nothing is copied).
_STANDARD_SCALES = "_tuneforge_standard_scales"
# bitsandbytes' repack reorders rows in tiles of this many (its `block_n`).
_REPACK_ROWS = 32


def _linear4bit_class():
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit


def linear4bit_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every bitsandbytes Linear4bit in `model` (`model` itself included)."""
    if "bitsandbytes" not in sys.modules:  # nothing can be 4-bit, and its import is not free
        return []
    cls = _linear4bit_class()
    return [module for module in model.modules() if isinstance(module, cls)]


def _quant_state(layer):
    state = getattr(layer.weight, "quant_state", None)
    return state if state is not None else getattr(layer, "quant_state", None)


def is_repacked(quant_state) -> bool:
    """True when bitsandbytes has rewritten this weight into its CPU-only layout."""
    return bool(getattr(quant_state, "packing_format_for_cpu", False))


@functools.cache
def cpu_repacks() -> bool:
    """Whether bitsandbytes repacks 4-bit weights for its CPU gemm on this machine (AVX512-BF16)."""
    import bitsandbytes.functional as bnbf

    # Older bitsandbytes (0.48) has neither the check nor the repack.
    check = getattr(bnbf, "has_avx512bf16", None)
    return bool(check and check() and hasattr(bnbf, "_convert_weight_packed_for_cpu"))


@functools.cache
def cpu_dequantize_exact() -> bool:
    """Whether bitsandbytes' CPU dequantize_4bit is right for rows that are not whole blocks.

    Probed once on a [2, 80] weight (in % 16 == 0, in % 64 != 0: the case its AVX512 kernel gets
    wrong) against the NF4 formula; a bitsandbytes that fixes the kernel passes the probe.
    """
    import bitsandbytes.functional as bnbf

    from tuneforge.kernels.nf4 import reference_dequantize_nf4

    weight = torch.linspace(-1, 1, 160).reshape(2, 80)
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type="nf4")
    exact = torch.equal(bnbf.dequantize_4bit(packed, state), reference_dequantize_nf4(packed, state))
    if not exact:
        log.info("bitsandbytes' CPU dequantize_4bit is wrong on this CPU for rows that are not whole blocks: "
                 "such 4-bit layers are computed through the NF4 formula instead")
    return exact


def _repackable(layer) -> bool:
    """Whether bitsandbytes' repack can take this layer (it asserts these, or reshapes wrongly)."""
    state = _quant_state(layer)
    if state is None or layer.weight.device.type != "cpu" or len(state.shape) != 2:
        return False
    rows, columns = (int(d) for d in state.shape)
    return rows % _REPACK_ROWS == 0 and columns % state.blocksize == 0 and columns % 2 == 0


def _keep_standard_scales(state) -> None:
    kept = getattr(state, _STANDARD_SCALES, None)
    if is_repacked(state) or (kept is not None and kept[0] is state.absmax):
        return
    setattr(state, _STANDARD_SCALES,
            (state.absmax, getattr(state, "state2", None), state.offset, state.nested, state.dtype))


def prevent_cpu_repack(model: torch.nn.Module) -> int:
    """Restore the standard layout and stop bitsandbytes from repacking again; returns the layers seen."""
    layers = linear4bit_layers(model)
    standard_layout(model)
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def allow_cpu_repack(model: torch.nn.Module) -> int:
    """Let bitsandbytes repack (its faster CPU inference) the layers it can; returns how many.

    Their standard block scales are kept first, so `standard_layout` can undo the repack exactly.
    """
    if not cpu_repacks():
        return 0
    standard_layout(model)  # scales bitsandbytes' inverse re-quantised are put back before keeping them
    count = 0
    for layer in linear4bit_layers(model):
        if _repackable(layer):
            _keep_standard_scales(_quant_state(layer))
            layer.support_avx512bf16_for_cpu = True
            count += 1
        else:
            layer.support_avx512bf16_for_cpu = False
    return count


@contextlib.contextmanager
def exact_forwards(model: torch.nn.Module):
    """Inside: the standard layout and no repack, so forwards compute the model's exact function
    (NF4 dequantised in its compute dtype; the repacked gemm rounds activations and block scales to
    bf16), e.g. for a reference that exports are checked against. On exit, layers that were allowed
    to repack (`for_inference`) are allowed again: the next generate repacks them, ~1 s for SmolLM2."""
    allowed = [layer for layer in linear4bit_layers(model) if getattr(layer, "support_avx512bf16_for_cpu", False)]
    prevent_cpu_repack(model)
    try:
        yield model
    finally:
        for layer in allowed:
            layer.support_avx512bf16_for_cpu = True


def standard_layout(model: torch.nn.Module) -> int:
    """Put every repacked 4-bit weight of `model` back into bitsandbytes' standard layout, in place.

    Exact where `allow_cpu_repack` kept the scales (always, for models tuneforge loads), including
    a weight that bitsandbytes' own inverse has already unpacked (peft's `save_pretrained` runs it
    through `_save_to_state_dict`): its re-quantised scales are replaced by the kept ones. A weight
    bitsandbytes repacked before tuneforge saw it gets its bf16-rounded scales back, with a warning.
    Returns how many weights were changed. Cheap when none is repacked (attribute reads).
    """
    restored = 0
    for layer in linear4bit_layers(model):
        state = _quant_state(layer)
        if is_repacked(state):
            _restore(layer.weight, state)
            restored += 1
        elif _unpacked_by_bitsandbytes(state):
            _put_back_scales(state, getattr(state, _STANDARD_SCALES))
            restored += 1
    return restored


def _unpacked_by_bitsandbytes(state) -> bool:
    """Repacked, then unpacked by bitsandbytes' inverse (it sets the flag False; a weight never
    repacked has no flag), which re-quantised the scales we kept."""
    kept = getattr(state, _STANDARD_SCALES, None)
    return (getattr(state, "packing_format_for_cpu", None) is False and kept is not None
            and kept[0] is not state.absmax and kept[0].device == state.absmax.device)


def _put_back_scales(state, kept) -> None:
    state.absmax, state2, state.offset, state.nested, state.dtype = kept
    if state2 is not None:
        state.state2 = state2


_warned_lossy = False


def _restore(weight, state) -> None:
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    global _warned_lossy
    kept = getattr(state, _STANDARD_SCALES, None)
    transposed_scales = state.absmax  # [in / blocksize, out], bf16
    # The inverse restores the nibbles exactly; our kept scales replace the ones it would
    # re-quantise from bf16.
    state.original_nested = False
    data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state, block_n=_REPACK_ROWS)
    weight.data = data
    if kept is not None:
        _put_back_scales(state, kept)
        return
    # Repacked by bitsandbytes before we saw the layer: the best we have is the bf16 scales, in
    # the standard (un-nested, row-major, fp32) form our readers and bitsandbytes' take.
    state.absmax = transposed_scales.t().reshape(-1).float().contiguous()
    state.nested = False
    if not _warned_lossy:
        _warned_lossy = True
        log.warning("a 4-bit weight had been repacked by bitsandbytes for its CPU kernel before tuneforge saw "
                    "it; its layout is restored, but bitsandbytes rounded its block scales to bf16, so exports "
                    "may differ from the loaded model by that rounding (load through tuneforge to keep them)")


def dequantize_4bit(weight: torch.Tensor, quant_state=None) -> torch.Tensor:
    """The dense [out, in] weight, in quant_state.dtype, of a bitsandbytes 4-bit weight.

    weight: the `Params4bit` (restored to the standard layout first if repacked) or its packed data
    with `quant_state`. bitsandbytes dequantises it, except on a CPU where its kernel is wrong for
    this shape: then the NF4 formula (`kernels.nf4.reference_dequantize_nf4`), to the same bits.
    """
    import bitsandbytes.functional as bnbf

    state = quant_state if quant_state is not None else weight.quant_state
    if is_repacked(state):
        if getattr(weight, "quant_state", None) is not state:
            raise ValueError("this 4-bit weight is in bitsandbytes' CPU-repacked layout; pass the Params4bit "
                             "(or call tuneforge.integration.bnb.standard_layout(model)) so it can be restored")
        _restore(weight, state)
    data = weight.data
    if data.device.type == "cpu" and int(state.shape[-1]) % int(state.blocksize) and not cpu_dequantize_exact():
        from tuneforge.kernels.nf4 import reference_dequantize_nf4

        return reference_dequantize_nf4(data, state)
    return bnbf.dequantize_4bit(data, state)


def needs_exact_forward(layer) -> bool:
    """Whether bitsandbytes' own forward of this Linear4bit would dequantise it wrongly (see above)."""
    state = _quant_state(layer)
    return (state is not None and layer.weight.device.type == "cpu"
            and int(state.shape[-1]) % int(state.blocksize) != 0 and not cpu_dequantize_exact())


def linear4bit_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' Linear4bit forward, or, where its CPU dequantisation is wrong for this layer's
    shape, x @ W^T + b with W from the NF4 formula (autograd flows to x as through bitsandbytes').

    x: [..., in] -> [..., out] in x's dtype, computed in the layer's compute dtype.
    """
    if not needs_exact_forward(layer) or x.device.type != "cpu":
        return type(layer).forward(layer, x)
    compute = layer.compute_dtype or x.dtype
    bias = None if layer.bias is None else layer.bias.to(compute)
    return torch.nn.functional.linear(x.to(compute), dequantize_4bit(layer.weight).to(compute), bias).to(x.dtype)


def prepare(model: torch.nn.Module) -> int:
    """At load: no CPU repack (training and exports read the weights), and layers whose CPU
    dequantisation bitsandbytes gets wrong forward through the NF4 formula. Returns the layers
    seen."""
    import types

    layers = linear4bit_layers(model)
    prevent_cpu_repack(model)
    wrong = [layer for layer in layers if needs_exact_forward(layer)]
    for layer in wrong:
        layer.forward = types.MethodType(linear4bit_forward, layer)
    if wrong:
        log.info("%d 4-bit layer(s) have rows that are not whole blocks: their CPU forward uses the NF4 formula "
                 "(bitsandbytes' CPU dequantisation is wrong for them on this CPU)", len(wrong))
    return len(layers)


# ------------------------------------------------------------------------------------------------
# Testing: the repack on any CPU
# ------------------------------------------------------------------------------------------------


def force_cpu_repack(model: torch.nn.Module) -> int:
    """Repack every layer bitsandbytes can repack, as its forward does on an AVX512-BF16 CPU, on
    any CPU (bitsandbytes' own conversion function). For tests; returns how many were repacked.

    Scales are kept only where `allow_cpu_repack` kept them, as in a real run.
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    count = 0
    for layer in linear4bit_layers(model):
        state = _quant_state(layer)
        if _repackable(layer) and not is_repacked(state):
            layer.weight.data, state = _convert_weight_packed_for_cpu(layer.weight.data, state)
            count += 1
    return count
