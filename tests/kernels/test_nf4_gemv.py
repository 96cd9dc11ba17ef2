"""nf4_matmul: y = x @ dequant(W)^T + bias for 1-8 rows, the NF4 weight read packed once.

Reference: `reference_nf4_matmul` (the weight dequantised in fp32 by the plain-PyTorch
`reference_dequantize_nf4`, itself proven bit-identical to bitsandbytes in test_nf4.py; the product
in fp32). Weights are quantised by bitsandbytes itself (NF4, blocksize 64, double-quantised absmax
unless a test says otherwise). K is an odd multiple of the blocksize and N is not a multiple of any
tile, so partial tiles and partial K steps are exercised.

Tolerances, as a fraction of max|reference| of the case:
- fp32: 1e-5. Only the order of fp32 sums differs.
- bf16 / fp16: 2^-7. y is rounded once to 16 bits (2^-9 relative), and the dot path (3+ rows)
  rounds each dequantised weight to x's dtype as `dequantize_nf4` would (2^-9 relative each, of
  random sign). A wrong nibble, absmax block or split-K range moves y by tens of percent.

The decode dispatch (lora.projections' entry points, the Linear4bit forward of patch.linear4bit)
is held to what the dequantise+GEMM path computes on the same weights.
"""

import bitsandbytes as bnb
import bitsandbytes.functional as BF
import pytest
import torch
import torch.nn as nn

from kernel_checks import use_switches

import tuneforge.kernels.nf4_gemv as gemv
import tuneforge.lora.projections as lora_ops
from tuneforge.kernels.lora import LoRAProjection
from tuneforge.kernels.nf4_gemv import (
    GemvConfig,
    default_config,
    nf4_matmul,
    nf4_matmul_unsupported,
    reference_nf4_matmul,
)
from tuneforge.lora.projections import lora_linear, lora_mlp, lora_qkv
from tuneforge.patch.linear4bit import linear4bit_forward

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-7}


def _quantize(n, k, nested=True, storage=torch.uint8, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    return BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested, quant_storage=storage)


def _randn(*shape, dtype=torch.float32, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def _assert_close(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = want.float().abs().max().item()
    err = (got.float() - want.float()).abs().max().item()
    assert err <= TOLERANCE[want.dtype] * scale, f"max error {err:.3g} vs max|ref| {scale:.3g}"


def _configs(dtype):
    """The default launch, the FMA path split over K, and (16-bit x) the dot path split over K."""
    configs = [None, GemvConfig(split_k=2)]
    if dtype != torch.float32:
        configs.append(GemvConfig(use_dot=True, split_k=3, block_n=16))
    return configs


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n, k, bias", [(96, 320, False), (200, 448, True)], ids=["96x320", "200x448-bias"])
def test_matches_reference(n, k, bias, dtype, rows):
    packed, state = _quantize(n, k)
    x = _randn(rows, k, dtype=dtype)
    b = _randn(n, seed=2) if bias else None
    want = reference_nf4_matmul(x, packed, state, b)
    for config in _configs(dtype):
        _assert_close(nf4_matmul(x, packed, state, b, config=config), want)


def test_fp16_plain_absmax_and_bf16_storage():
    """fp32 absmax (no double quantisation), fp16 x, and FSDP's bf16 quant_storage."""
    packed, state = _quantize(72, 192, nested=False)
    x = _randn(5, 192, dtype=torch.float16)
    want = reference_nf4_matmul(x, packed, state)
    for config in _configs(torch.float16):
        _assert_close(nf4_matmul(x, packed, state, config=config), want)
    packed, state = _quantize(72, 192, storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    x = _randn(2, 192, dtype=torch.bfloat16)
    _assert_close(nf4_matmul(x, packed, state), reference_nf4_matmul(x, packed, state))


def test_leading_dims_strided_rows_and_a_fresh_output():
    packed, state = _quantize(40, 128)
    x = _randn(2, 3, 200)[..., 8:136]  # rows 200 apart: read through the stride, not copied
    y = nf4_matmul(x, packed, state)
    assert y.shape == (2, 3, 40) and y._base is None  # callers may modify it in place
    _assert_close(y, reference_nf4_matmul(x, packed, state))
    assert nf4_matmul(x[:0], packed, state).shape == (0, 3, 40)


def test_bad_input_is_a_clear_error():
    packed, state = _quantize(40, 128)
    with pytest.raises(ValueError, match="at most 8 rows"):
        nf4_matmul(_randn(9, 128), packed, state)
    with pytest.raises(ValueError, match="x has 64 features but the weight takes 128"):
        nf4_matmul(_randn(1, 64), packed, state)
    with pytest.raises(ValueError, match="16-bit x only"):
        nf4_matmul(_randn(1, 128), packed, state, config=GemvConfig(use_dot=True))
    with pytest.raises(ValueError, match=r"bias must have shape \(40,\)"):
        nf4_matmul(_randn(1, 128), packed, state, _randn(39))
    packed, state = _quantize(40, 96)  # rows of 1.5 absmax blocks
    assert nf4_matmul_unsupported(state) == "in_features 96 is not a multiple of the blocksize 64"
    with pytest.raises(ValueError, match="not a multiple of the blocksize"):
        nf4_matmul(_randn(1, 96), packed, state)


def test_default_config_picks_fma_for_one_or_two_rows_and_fp32():
    device = torch.device(DEVICE)
    assert not default_config(2, 4096, 4096, torch.bfloat16, device).use_dot
    assert default_config(3, 4096, 4096, torch.bfloat16, device).use_dot
    assert not default_config(8, 4096, 4096, torch.float32, device).use_dot


@pytest.mark.gpu
def test_gpu_split_k_fills_the_sms_for_8b_shapes():
    device = torch.device("cuda")
    # 128 tiles of 32 rows for a 4096-row output: split; 448 tiles for 14336 rows: not.
    assert default_config(1, 4096, 4096, torch.bfloat16, device).split_k > 1
    assert default_config(1, 4096, 14336, torch.bfloat16, device).split_k > 1
    assert default_config(1, 14336, 4096, torch.bfloat16, device).split_k == 1


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 8])
def test_gpu_cuda_graph_replay_equals_eager(rows):
    """Captured once, replayed on new inputs: no host sync or value-dependent branch inside."""
    packed, state = _quantize(1024, 4096)  # split over K on an H100: the partial-sum kernel too
    bias = _randn(1024, dtype=torch.bfloat16)
    static_x = _randn(rows, 4096, dtype=torch.bfloat16)
    nf4_matmul(static_x, packed, state, bias)  # compile and fill the launch-argument cache first
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        nf4_matmul(static_x, packed, state, bias)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = nf4_matmul(static_x, packed, state, bias)
    for seed in (5, 6):
        static_x.copy_(_randn(rows, 4096, dtype=torch.bfloat16, seed=seed))
        graph.replay()
        assert torch.equal(static_y, nf4_matmul(static_x, packed, state, bias))
        _assert_close(static_y, reference_nf4_matmul(static_x, packed, state, bias))


# --- decode dispatch ------------------------------------------------------------------------------


class _Calls:
    """Counts nf4_matmul calls made through lora.projections and the Linear4bit forward (both reach it
    through patch.linear4bit.decode_matmul, which picks it on the CPU)."""

    def __init__(self, monkeypatch):
        self.count = 0
        monkeypatch.setattr(gemv, "nf4_matmul", self)
        # On CUDA decode_matmul picks bitsandbytes unless told: these tests are about our kernel.
        use_switches(monkeypatch, nf4_gemv=True)

    def __call__(self, *args, **kwargs):
        self.count += 1
        return nf4_matmul(*args, **kwargs)


def _projection(n, k, seed, bias=False, rank=4):
    """An NF4 base with a random LoRA adapter (A and B frozen, as at inference)."""
    packed, state = _quantize(n, k, seed=seed)
    return LoRAProjection(packed, state, _randn(n, seed=seed + 1) if bias else None,
                          _randn(rank, k, seed=seed + 2) * 0.1, _randn(n, rank, seed=seed + 3) * 0.1, 0.5)


def _lora_outputs(x):
    # hidden 128, q 96, k/v 32 (GQA-like), MLP 192; down_proj reads 192 = 3 absmax blocks per row.
    # o_proj reads 96 = 1.5 absmax blocks per row: nf4_matmul can't, so it keeps dequantise + GEMM.
    q, k, v, o = _projection(96, 128, 10, bias=True), _projection(32, 128, 20), _projection(32, 128, 30), _projection(128, 96, 40)
    gate, up, down = _projection(192, 128, 50), _projection(192, 128, 60), _projection(128, 192, 70)
    return (*lora_qkv(x, q, k, v), lora_linear(x[..., :96], o), lora_mlp(x, gate, up, down, "silu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lora_decode_step_equals_the_function_path(dtype, monkeypatch):
    x = _randn(2, 3, 128, dtype=dtype)
    calls = _Calls(monkeypatch)
    with torch.no_grad():
        got = _lora_outputs(x)
        assert calls.count == 6  # q, k, v, gate, up, down
        monkeypatch.setattr(lora_ops, "GEMV_MAX_ROWS", 0)  # the dispatch off: the autograd Functions
        want = _lora_outputs(x)
    assert calls.count == 6
    for a, b in zip(got, want):
        _assert_close(a, b)


def test_lora_calls_that_may_need_gradients_keep_the_function_path(monkeypatch):
    calls = _Calls(monkeypatch)
    x = _randn(3, 128)
    p = _projection(40, 128, 1)
    p.lora_A.requires_grad_()  # training: the adapter wants its gradient even though x does not
    assert lora_linear(x, p).requires_grad and calls.count == 0
    assert lora_linear(x.requires_grad_(), _projection(40, 128, 1)).requires_grad and calls.count == 0
    with torch.no_grad():
        lora_linear(_randn(9, 128), p)  # more rows than a decode step: dequantise + GEMM
        assert calls.count == 0
        lora_linear(x, p)
        assert calls.count == 1


def _linear4bit(n, k, bias=True):
    layer = bnb.nn.Linear4bit(k, n, bias=bias, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(_randn(n, k).cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    if bias:
        layer.bias = nn.Parameter(_randn(n, seed=3).cpu(), requires_grad=False)
    return layer.to(DEVICE)  # moving a Params4bit quantises it


def test_linear4bit_forward_equals_bitsandbytes(monkeypatch):
    calls = _Calls(monkeypatch)
    layer = _linear4bit(72, 192)
    x = _randn(1, 3, 192, dtype=torch.bfloat16)  # computed in the layer's fp32, returned in bf16
    with torch.no_grad():
        want = layer(x)
        got = linear4bit_forward(layer, x)
        assert calls.count == 1
        linear4bit_forward(layer, _randn(9, 192))  # not a decode step: bitsandbytes' own forward
        assert calls.count == 1
    _assert_close(got, want)
    assert linear4bit_forward(layer, x.requires_grad_()).requires_grad and calls.count == 1


# --- a patched tiny model generating in 4-bit ------------------------------------------------------


def _generate(model, calls, prompt):
    """Greedy decode of 3 tokens: a batch-2 prefill (16 rows: the autograd Functions), then 2-row steps."""
    before = calls.count
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits), calls.count - before


def _assert_same_generation(model, monkeypatch):
    calls = _Calls(monkeypatch)
    prompt = torch.randint(3, 317, (2, 8), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    tokens, logits, used = _generate(model, calls, prompt)
    monkeypatch.setattr(lora_ops, "GEMV_MAX_ROWS", 0)
    monkeypatch.setattr(gemv, "MAX_ROWS", 0)  # linear4bit_forward's limit too (nf4_matmul would now raise)
    want_tokens, want_logits, unused = _generate(model, calls, prompt)
    assert used > 0 and unused == 0
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4 * want_logits.abs().max().item())
    assert torch.equal(tokens, want_tokens)


def _load_4bit(folder):
    from tuneforge import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(str(folder), load_in_4bit=True, dtype=torch.float32,
                                                 use_kernels=True, max_seq_length=64)
    return model


def test_tiny_lora_model_generates_the_same_logits_with_the_gemv(tiny_llama_dir, monkeypatch, one_thread):
    """Fused LoRA on NF4 (lora.projections' decode dispatch); the tiny MLP's down_proj reads 176 =
    2.75 absmax blocks per row, so it keeps dequantise + GEMM: both paths in one model."""
    from tuneforge import FastLanguageModel
    from tuneforge.testing.tiny import randomize_lora_b

    model = FastLanguageModel.get_peft_model(_load_4bit(tiny_llama_dir), r=8, lora_alpha=16,
                                             use_gradient_checkpointing=False)
    assert model.get_base_model().tuneforge.lora_kernels == ["lora_mlp", "lora_qkv", "lora_linear"]
    randomize_lora_b(model)
    _assert_same_generation(model.eval(), monkeypatch)


def test_tiny_base_model_generates_the_same_logits_with_the_gemv(tiny_llama_dir, monkeypatch, one_thread):
    """No adapter: tuneforge.patch binds linear4bit_forward to every bitsandbytes Linear4bit."""
    model = _load_4bit(tiny_llama_dir)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert "nf4_gemv" in model.tuneforge.kernels and len(layers) == 14
    assert all(layer.forward.__func__.func is linear4bit_forward for layer in layers)  # bound with the switch
    _assert_same_generation(model.eval(), monkeypatch)
