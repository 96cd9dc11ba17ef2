"""dequantize_nf4 reproduces bitsandbytes' dequantize_4bit bit for bit; get_base_weight finds the dense weight.

Exact equality is the bar (no tolerance): the kernel does bitsandbytes' fp32 arithmetic in the
same order, with fused multiply-add switched off on the GPU and bf16 rounded to nearest even under
the interpreter, as the GPU converts.

The oracle is `bitsandbytes_dequantize`: bitsandbytes' dequantize_4bit, except where its AVX512 CPU
kernel is wrong (rows that are not whole blocks: 64 x 176, 96 x 80, issue 14), where bitsandbytes'
own generic PyTorch implementation stands in, so the odd shapes keep their oracle on every CPU.
"""

import bitsandbytes as bnb
import bitsandbytes.functional as BF
import pytest
import torch
import torch.nn as nn

from tuneforge.integration.weights import get_base_weight
from tuneforge.kernels.nf4 import dequantize_nf4, reference_dequantize_nf4
from tuneforge.testing.bitsandbytes import bitsandbytes_dequantize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _quantize(shape, nested, quant_type="nf4", dtype=torch.float32, storage=torch.uint8, seed=0):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    return BF.quantize_4bit(
        w, blocksize=64, compress_statistics=nested, quant_type=quant_type, quant_storage=storage
    )


def _assert_identical(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want), f"max diff {(got.float() - want.float()).abs().max().item()}"


@pytest.mark.parametrize("nested", [False, True], ids=["absmax-fp32", "double-quant"])
@pytest.mark.parametrize(
    "shape",
    # 7x9 and 33 leave a partial last block and an odd element count (half-used last byte).
    [(176, 64), (64, 176), (1000, 576), (7, 9), (33,)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_matches_bitsandbytes_all_out_dtypes(shape, nested):
    packed, qs = _quantize(shape, nested)
    for out_dtype in DTYPES:
        qs.dtype = out_dtype  # bitsandbytes dequantises to quant_state.dtype
        want = bitsandbytes_dequantize(packed, qs)
        _assert_identical(dequantize_nf4(packed, qs), want)
        _assert_identical(reference_dequantize_nf4(packed, qs), want)


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=["storage-u8", "storage-bf16"])
def test_quant_storage_and_original_dtype(storage):
    """A bf16 weight quantised with bf16 storage (FSDP layout) dequantises to bf16 by default."""
    packed, qs = _quantize((96, 80), nested=True, dtype=torch.bfloat16, storage=storage)
    assert packed.dtype == storage
    want = bitsandbytes_dequantize(packed, qs)
    assert want.dtype == torch.bfloat16
    _assert_identical(dequantize_nf4(packed, qs), want)
    # fp32 out is the unrounded value: rounding it to bf16 gives bitsandbytes' bf16 result.
    _assert_identical(dequantize_nf4(packed, qs, out_dtype=torch.float32).bfloat16(), want)


def test_out_writes_several_weights_into_the_rows_of_one_buffer():
    """q/k/v-style weights of 48, 24 and 24 rows dequantised into one [96, 72] buffer, row blocks in order."""
    parts = [_quantize((rows, 72), nested=True, seed=rows + i) for i, rows in enumerate((48, 24, 24))]
    buffer = torch.full((96, 72), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    for (packed, qs), rows in zip(parts, buffer.split((48, 24, 24))):
        assert dequantize_nf4(packed, qs, out=rows) is rows
    qs_dtype = [qs.dtype for _, qs in parts]
    for _, qs in parts:
        qs.dtype = torch.bfloat16
    want = torch.cat([bitsandbytes_dequantize(packed, qs) for packed, qs in parts])
    _assert_identical(buffer, want)
    packed, qs = parts[0]
    qs.dtype = qs_dtype[0]
    with pytest.raises(ValueError, match=r"out must be a contiguous \(48, 72\) tensor"):
        dequantize_nf4(packed, qs, out=buffer[:48, :36])
    with pytest.raises(ValueError, match="out must be a contiguous"):
        dequantize_nf4(packed, qs, out=torch.empty(72, 48, device=DEVICE).t())


def test_fp4_reads_with_the_same_kernel():
    packed, qs = _quantize((64, 176), nested=True, quant_type="fp4")
    _assert_identical(dequantize_nf4(packed, qs), bitsandbytes_dequantize(packed, qs))


def test_shape_mismatch_raises():
    packed, qs = _quantize((64, 176), nested=False)
    with pytest.raises(ValueError, match="needs 5632"):
        dequantize_nf4(packed[:-1], qs)


def _linear4bit(linear: nn.Linear, nested=True) -> nn.Module:
    q = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        compute_dtype=torch.float32, quant_type="nf4", compress_statistics=nested,
    )
    q.weight = bnb.nn.Params4bit(
        linear.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=nested
    )
    return q.to(DEVICE)  # moving a Params4bit quantises it


def test_get_base_weight_of_linear_linear4bit_and_peft_layer():
    from peft import LoraConfig, get_peft_model

    lin = nn.Linear(64, 40, bias=False).to(DEVICE)
    assert get_base_weight(lin) is lin.weight
    assert get_base_weight(lin, torch.bfloat16).dtype == torch.bfloat16

    q = _linear4bit(lin)
    want = bitsandbytes_dequantize(q.weight.data, q.weight.quant_state)
    _assert_identical(get_base_weight(q), want)

    wrapped = get_peft_model(nn.Sequential(q), LoraConfig(r=4, target_modules=["0"]))
    lora_layer = wrapped.base_model.model[0]
    assert hasattr(lora_layer, "lora_A")
    _assert_identical(get_base_weight(lora_layer), want)
    _assert_identical(get_base_weight(lora_layer, torch.float16), want.half())


def test_get_base_weight_rejects_what_it_cannot_read():
    unquantised = bnb.nn.Linear4bit(64, 40, quant_type="nf4")  # Params4bit not yet moved/quantised
    with pytest.raises(ValueError, match="not quantised"):
        get_base_weight(unquantised)
    int8 = bnb.nn.Linear8bitLt(64, 40, has_fp16_weights=False)
    int8.weight = bnb.nn.Int8Params(torch.randn(40, 64), requires_grad=False, has_fp16_weights=False)
    with pytest.raises(NotImplementedError, match="8-bit"):
        get_base_weight(int8.to(DEVICE))


@pytest.mark.parametrize("nested", [False, True], ids=["absmax-fp32", "double-quant"])
@pytest.mark.parametrize("rows", [(48, 24, 24), (176, 176), (7, 33, 5)], ids=["qkv", "gate-up", "odd"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_rows_of_several_weights_in_one_launch_equal_one_by_one(rows, nested, out_dtype):
    """Q|K|V or gate|up: one launch writes every weight into its row block, bit for bit as
    dequantize_nf4 of each (odd sizes leave partial blocks and half-used bytes at the seams)."""
    from tuneforge.kernels.nf4 import dequantize_nf4_rows

    width = 9 if rows == (7, 33, 5) else 72
    weights = [_quantize((n, width), nested, seed=n + i) for i, n in enumerate(rows)]
    for _, qs in weights:
        qs.dtype = out_dtype
    out = torch.full((sum(rows), width), float("nan"), dtype=out_dtype, device=DEVICE)
    assert dequantize_nf4_rows(weights, out) is out
    _assert_identical(out, torch.cat([bitsandbytes_dequantize(packed, qs) for packed, qs in weights]))


def test_rows_of_mixed_weights_fall_back_to_one_by_one():
    """Different nesting (or more than three weights) still land in their rows, one launch each."""
    from tuneforge.kernels.nf4 import dequantize_nf4_rows

    weights = [_quantize((16, 64), nested=True), _quantize((8, 64), nested=False, seed=3)]
    out = torch.empty(24, 64, device=DEVICE)
    dequantize_nf4_rows(weights, out)
    _assert_identical(out, torch.cat([bitsandbytes_dequantize(packed, qs) for packed, qs in weights]))
    with pytest.raises(ValueError, match=r"out must be a contiguous \[24, in\] tensor"):
        dequantize_nf4_rows(weights, torch.empty(23, 64, device=DEVICE))
