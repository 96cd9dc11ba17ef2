"""softcap_attention (Triton flash, soft-capped logits) against reference_softcap_attention.

The reference runs each sample alone through the eager formula in fp32 (kernels/varlen_attention.py);
the kernel runs under the Triton interpreter on the CPU (fp32: tight tolerances) and on a GPU
(bf16: the tolerances of a bf16 attention). Cases cover several samples per row (one shorter than
a tile, one spanning several tiles), GQA, sliding windows shorter than a sample, soft-cap on and
off, gradients of q, k and v, and the dense [B, H, S, D] entry point against transformers' own eager
Gemma 2 attention formula. Negative control: without the cap the outputs differ.
"""

from __future__ import annotations

import math

import pytest
import torch

from tuneforge.kernels.softcap_attention import (
    dense_softcap_attention,
    reference_softcap_attention,
    softcap_attention,
)


def _inputs(lengths, heads=4, kv_heads=2, dim=32, dtype=torch.float32, device="cpu", seed=0, spread=3.0):
    generator = torch.Generator().manual_seed(seed)
    tokens = sum(lengths)
    q, k, v = (torch.randn(tokens, h, dim, generator=generator) * s
               for h, s in ((heads, spread), (kv_heads, spread), (kv_heads, 1.0)))
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return [t.to(device=device, dtype=dtype).requires_grad_(True) for t in (q, k, v)], cu.to(device)


def _check(lengths, softcap, window, dtype=torch.float32, device="cpu", dim=32, atol=2e-5, rtol=2e-4):
    (q, k, v), cu = _inputs(lengths, dim=dim, dtype=dtype, device=device)
    scale = 1 / math.sqrt(dim)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(device=device, dtype=dtype)
    out = softcap_attention(q, k, v, cu, max(lengths), scale, softcap, window)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref_inputs = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    want_out = reference_softcap_attention(*ref_inputs, cu, max(lengths), scale, softcap, window)
    want = torch.autograd.grad(want_out, ref_inputs, grad.double())
    torch.testing.assert_close(out.double(), want_out, atol=atol, rtol=rtol)
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g.double(), w, atol=atol, rtol=rtol, msg=f"d{name}")
    return out


CASES = [
    ((5, 37, 16), 50.0, None),   # samples shorter than, equal to and longer than a 16-token tile
    ((40,), 5.0, None),          # a small cap: most logits in tanh's curved part
    ((33, 20), 50.0, 7),         # sliding window shorter than the samples
    ((29, 3), None, None),       # no cap: plain attention
]


@pytest.mark.parametrize("lengths, softcap, window", CASES)
def test_matches_reference_on_cpu(lengths, softcap, window):
    _check(lengths, softcap, window)


def test_head_dim_not_a_power_of_two():
    _check((19, 12), 20.0, None, dim=24)


def test_the_cap_matters():
    (q, k, v), cu = _inputs((30,), spread=6.0)
    capped = softcap_attention(q, k, v, cu, 30, 0.2, 5.0)
    plain = softcap_attention(q, k, v, cu, 30, 0.2, None)
    assert (capped - plain).abs().max() > 1e-2


def test_dense_entry_matches_transformers_gemma2_eager():
    """[B, H, S, D] with no padding against transformers' eager attention of Gemma 2 (mask: causal)."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    generator = torch.Generator().manual_seed(1)
    batch, heads, kv_heads, seq, dim = 2, 4, 2, 24, 32
    q = torch.randn(batch, heads, seq, dim, generator=generator) * 3
    k = torch.randn(batch, kv_heads, seq, dim, generator=generator) * 3
    v = torch.randn(batch, kv_heads, seq, dim, generator=generator)

    class Module(torch.nn.Module):
        num_key_value_groups = heads // kv_heads
        training = False

    causal = torch.full((seq, seq), float("-inf")).triu(1)[None, None].expand(batch, 1, seq, seq)
    want, _ = eager_attention_forward(Module(), q, k, v, causal, dropout=0.0, scaling=dim ** -0.5, softcap=30.0)
    got = dense_softcap_attention(q, k, v, dim ** -0.5, 30.0)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-4)


def test_refuses_mismatched_heads():
    (q, k, v), cu = _inputs((8,), heads=3, kv_heads=2)
    with pytest.raises(ValueError, match="not a multiple"):
        softcap_attention(q, k, v, cu, 8, 0.1, 50.0)


@pytest.mark.gpu
@pytest.mark.parametrize("lengths, softcap, window", CASES + [((700, 129, 1300), 50.0, 512)])
@pytest.mark.parametrize("dim", [64, 256])
def test_matches_reference_on_gpu_bf16(lengths, softcap, window, dim):
    _check(lengths, softcap, window, dtype=torch.bfloat16, device="cuda", dim=dim, atol=3e-2, rtol=3e-2)


def test_supported_says_why_not(monkeypatch):
    import tuneforge.kernels.softcap_attention as module

    assert module.softcap_supported(32, 4, 2, torch.float32, torch.device("cpu")) is None  # interpreter: builds
    assert "head_dim 512" in module.softcap_supported(512, 4, 2, torch.float32, torch.device("cpu"))
    assert "not a multiple" in module.softcap_supported(32, 3, 2, torch.float32, torch.device("cpu"))
    monkeypatch.setattr(module, "TRITON_INTERPRETER", False)
    assert "TRITON_INTERPRET=1" in module.softcap_supported(32, 4, 2, torch.float32, torch.device("cpu"))


def test_supported_refuses_a_kernel_that_computes_wrongly(monkeypatch):
    """The load-time check compares with the reference: a kernel that miscomputes is not used."""
    import tuneforge.kernels.softcap_attention as module

    real = module.softcap_attention
    monkeypatch.setattr(module, "softcap_attention", lambda q, *a: real(q, *a) * 1.1)
    assert "output differs from the reference" in module.softcap_supported(32, 4, 2, torch.float32, torch.device("cpu"))
