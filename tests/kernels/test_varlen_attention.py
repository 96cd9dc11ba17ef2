"""Varlen attention (kernels/varlen_attention.py) equals attention over the whole packed row with a
block-diagonal causal mask, which is what transformers computes for a packed batch.

The oracle here is independent of the op: one SDPA / eager call over all T tokens with an explicit
[T, T] mask built from the sample boundaries (GQA by repeating kv heads). On the CPU the op runs its
reference (per-sample loop); on a GPU (`gpu` marker) the flash varlen kernel, in bf16 and fp16.
"""

import pytest
import torch

from tuneforge.kernels.varlen_attention import (
    flash_varlen_supported,
    reference_varlen_attention,
    varlen_attention,
)

LENGTHS = {"one": [13], "odd": [7, 1, 19, 5, 33], "many short": [3] * 11 + [40]}


def masked_row_attention(q, k, v, lengths, scale, sliding_window=None, softcap=None):
    """Attention over the whole row [T, H, D] with a block-diagonal causal (windowed) mask, in fp64."""
    q, k, v = (t.double().transpose(0, 1) for t in (q, k, v))  # [H, T, D]
    groups = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
    sample = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(q.device)
    t = torch.arange(sample.numel(), device=q.device)
    allowed = (sample[:, None] == sample[None, :]) & (t[:, None] >= t[None, :])
    if sliding_window is not None:
        allowed &= (t[:, None] - t[None, :]) < sliding_window
    scores = q @ k.transpose(-1, -2) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    out = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    return out.transpose(0, 1)


def inputs(lengths, heads=4, kv_heads=2, dim=16, dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, heads, dim, generator=generator).to(device, dtype).requires_grad_()
    k = torch.randn(total, kv_heads, dim, generator=generator).to(device, dtype).requires_grad_()
    v = torch.randn(total, kv_heads, dim, generator=generator).to(device, dtype).requires_grad_()
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return q, k, v, cu.to(device)


def check(lengths, dtype, device, rtol, atol, **options):
    q, k, v, cu = inputs(lengths, dtype=dtype, device=device)
    scale = q.shape[-1] ** -0.5
    out = varlen_attention(q, k, v, cu, max(lengths), scale, **options)
    grad = torch.randn_like(out)
    out.backward(grad)
    got = [out.detach(), q.grad, k.grad, v.grad]
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    want_out = masked_row_attention(q2, k2, v2, lengths, scale, **options)
    want_out.backward(grad.double())
    want = [want_out.detach(), q2.grad, k2.grad, v2.grad]
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == dtype and g.shape == w.shape, name
        torch.testing.assert_close(g.double(), w.double(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
@pytest.mark.parametrize("options", [{}, {"sliding_window": 4}, {"softcap": 5.0}], ids=["causal", "window", "softcap"])
def test_reference_equals_the_masked_row_on_cpu(lengths, options):
    check(lengths, torch.float32, "cpu", rtol=1e-5, atol=1e-5, **options)


def test_samples_do_not_see_each_other():
    # Negative control: changing one sample changes no other sample's output.
    q, k, v, cu = inputs([6, 9, 4])
    out = reference_varlen_attention(q, k, v, cu, 0.25)
    k2 = k.detach().clone()
    k2[6:15] += 1.0  # the second sample's keys
    out2 = reference_varlen_attention(q, k2, v, cu, 0.25)
    assert torch.equal(out[:6], out2[:6]) and torch.equal(out[15:], out2[15:])
    assert not torch.allclose(out[6:15], out2[6:15])


def test_flash_is_only_claimed_where_it_runs():
    q = torch.zeros(4, 2, 16, dtype=torch.bfloat16)
    assert not flash_varlen_supported(q)  # CPU
    if torch.cuda.is_available():
        assert flash_varlen_supported(q.cuda()) and not flash_varlen_supported(q.cuda().float())
        assert not flash_varlen_supported(q.cuda(), softcap=30.0)
        assert not flash_varlen_supported(q.cuda(), dropout=0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
@pytest.mark.parametrize("options", [{}, {"sliding_window": 4}], ids=["causal", "window"])
def test_flash_varlen_equals_the_masked_row_on_gpu(dtype, lengths, options):
    # bf16 / fp16 operands, fp32 accumulation: errors of a few units in the last place of bf16.
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    check(lengths, dtype, "cuda", rtol=tol, atol=tol, **options)
