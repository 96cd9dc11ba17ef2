"""fused_linear_cross_entropy equals full-logits cross-entropy (ours and transformers') in value and gradients.

Vocabulary sizes are the real ones cut down to test size and kept off powers of two (32000 ->
1000, 128256 -> 1283, 262144 -> 2621), so the kernel's masked vocabulary tail is always exercised;
one case runs the real 32000 in fp32 with few tokens. Small chunk sizes force several chunks.

Tolerances: fp32 results agree to float rounding (rtol 1e-5 on the loss, 1e-4 on gradients, with
atol 1e-5 for the soft-capped tanh which is built from exp). bf16 results are compared with the
reference fed the same bf16 tensors, which also forms logits and gradients in bf16: the loss to
1e-3 relative, gradients to 1% in relative norm (grad_weight sums chunks in bf16:
0.3% measured at 300 tokens).
"""

import pytest
import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

from tuneforge.kernels.cross_entropy import fused_linear_cross_entropy, reference_linear_cross_entropy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HIDDEN = 48


def _inputs(n_tokens, vocab, dtype, ignore_frac=0.25, hidden=HIDDEN, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n_tokens, hidden, generator=g)
    # Weight scale gives logits of a few units: a softmax neither flat nor one-hot.
    w = torch.randn(vocab, hidden, generator=g) * (2.0 / hidden**0.5)
    labels = torch.randint(0, vocab, (n_tokens,), generator=g)
    labels[torch.rand(n_tokens, generator=g) < ignore_frac] = -100
    if n_tokens and (labels == -100).all():
        labels[0] = 1
    h = h.to(DEVICE, dtype).requires_grad_()
    w = w.to(DEVICE, dtype).requires_grad_()
    return h, w, labels.to(DEVICE)


def _run(fn, h, w, labels, grad_scale=1.0, **kw):
    """Loss and (grad hidden, grad weight) of fn, with fresh leaf copies."""
    h = h.detach().clone().requires_grad_(h.requires_grad)
    w = w.detach().clone().requires_grad_(w.requires_grad)
    loss = fn(h, w, labels, **kw)
    (loss * grad_scale).backward()
    return loss.detach(), h.grad, w.grad


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _assert_close(got, want, dtype, soft=False):
    loss, gh, gw = got
    rloss, rgh, rgw = want
    if dtype == torch.float32:
        atol = 1e-5 if soft else 1e-6
        torch.testing.assert_close(loss, rloss, rtol=1e-5, atol=atol)
        torch.testing.assert_close(gh, rgh, rtol=1e-4, atol=atol)
        if rgw is not None:
            torch.testing.assert_close(gw, rgw, rtol=1e-4, atol=atol)
    else:
        torch.testing.assert_close(loss, rloss, rtol=1e-3, atol=1e-3)
        assert _rel(gh, rgh) < 1e-2
        if rgw is not None:
            assert _rel(gw, rgw) < 1e-2
    if rgw is None:
        assert gw is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "vocab,n_tokens,chunk_size",
    [(1000, 1, None), (1283, 17, 5), (2621, 300, 64)],
    ids=["V1000-T1", "V1283-T17-chunks", "V2621-T300-chunks"],
)
def test_matches_reference(dtype, vocab, n_tokens, chunk_size):
    h, w, labels = _inputs(n_tokens, vocab, dtype)
    got = _run(fused_linear_cross_entropy, h, w, labels, chunk_size=chunk_size)
    want = _run(reference_linear_cross_entropy, h, w, labels)
    _assert_close(got, want, dtype)


def test_real_32000_vocab_fp32():
    h, w, labels = _inputs(5, 32000, torch.float32, ignore_frac=0.0)
    got = _run(fused_linear_cross_entropy, h, w, labels, chunk_size=2)
    want = _run(reference_linear_cross_entropy, h, w, labels)
    _assert_close(got, want, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_items", [None, "tensor", "int"])
def test_matches_transformers_for_causal_lm_loss(dtype, num_items):
    """shift=True with unshifted [batch, seq] labels gives exactly transformers' causal-LM loss."""
    batch, seq, vocab = 2, 9, 1283
    h, w, labels = _inputs(batch * seq, vocab, dtype)
    h3 = h.detach().reshape(batch, seq, HIDDEN).requires_grad_()
    labels = labels.reshape(batch, seq)
    n_items = {None: None, "tensor": torch.tensor(23, device=DEVICE), "int": 23}[num_items]

    def transformers_loss(hh, ww, ll):
        logits = hh @ ww.t()  # the model's lm_head output, in the model's dtype
        return ForCausalLMLoss(logits, ll, vocab_size=vocab, num_items_in_batch=n_items)

    def ours(hh, ww, ll):
        return fused_linear_cross_entropy(hh, ww, ll, shift=True, num_items_in_batch=n_items, chunk_size=4)

    _assert_close(_run(ours, h3, w, labels), _run(transformers_loss, h3, w, labels), dtype)


@pytest.mark.parametrize(
    "dtype,softcap,scale",
    [
        (torch.float32, 3.0, None),  # Gemma 2 style (cap chosen low so tanh actually bends)
        (torch.bfloat16, 3.0, None),
        (torch.float32, None, 0.0625),  # Cohere: logits * logit_scale
        (torch.float32, None, 1 / 8.0),  # Granite: logits / logits_scaling -> scale = 1 / 8
        (torch.float32, 5.0, 1.7),
    ],
    ids=["softcap-fp32", "softcap-bf16", "cohere-scale", "granite-scale", "softcap+scale"],
)
def test_softcap_and_scale(dtype, softcap, scale):
    h, w, labels = _inputs(33, 1000, dtype)
    kw = dict(logit_softcap=softcap, logit_scale=scale)
    got = _run(fused_linear_cross_entropy, h, w, labels, chunk_size=16, **kw)
    _assert_close(got, _run(reference_linear_cross_entropy, h, w, labels, **kw), dtype, soft=True)

    def model_loss(hh, ww, ll):
        # What the transformers models do to the logits before ForCausalLMLoss-style CE.
        logits = (hh @ ww.t()).float()
        if scale is not None:
            logits = logits * scale
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, ll, ignore_index=-100)

    _assert_close(got, _run(model_loss, h, w, labels), dtype, soft=True)


def test_autocast_casts_inputs_like_the_lm_head_linear():
    """fp32 hidden and weight under bf16 autocast: the same as the autocast reference (bf16 logits)."""
    h, w, labels = _inputs(17, 1000, torch.float32)

    def under_autocast(fn):
        def run(*args, **kw):
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                return fn(*args, **kw)
        return run

    got = _run(under_autocast(fused_linear_cross_entropy), h, w, labels, chunk_size=5)
    want = _run(under_autocast(reference_linear_cross_entropy), h, w, labels)
    assert got[1].dtype == got[2].dtype == torch.float32
    _assert_close(got, want, torch.bfloat16)


def test_all_ignored_chunk_gets_zero_gradient():
    h, w, labels = _inputs(40, 1283, torch.float32, ignore_frac=0.0)
    labels[8:24] = -100  # chunks 1 and 2 (of 8 tokens) are wholly ignored
    labels[-3:] = -100
    got = _run(fused_linear_cross_entropy, h, w, labels, chunk_size=8)
    _assert_close(got, _run(reference_linear_cross_entropy, h, w, labels), torch.float32)
    assert torch.equal(got[1][8:24], torch.zeros_like(got[1][8:24]))


def test_all_ignored_batch_is_nan_like_torch():
    h, w, labels = _inputs(6, 1000, torch.float32)
    labels[:] = -100
    loss, gh, _ = _run(fused_linear_cross_entropy, h, w, labels)
    assert torch.isnan(loss) and torch.isnan(reference_linear_cross_entropy(h, w, labels))
    assert torch.equal(gh, torch.zeros_like(gh))


def test_frozen_weight_gives_no_weight_grad():
    h, w, labels = _inputs(17, 1000, torch.float32)
    w.requires_grad_(False)
    got = _run(fused_linear_cross_entropy, h, w, labels, chunk_size=6)
    _assert_close(got, _run(reference_linear_cross_entropy, h, w, labels), torch.float32)


def test_bias_and_grad_output_scaling():
    h, w, labels = _inputs(17, 1000, torch.float32)
    b = (torch.randn(1000, device=DEVICE) * 0.5).requires_grad_()
    grads = []
    for fn in (fused_linear_cross_entropy, reference_linear_cross_entropy):
        bb = b.detach().clone().requires_grad_()
        got = _run(fn, h, w, labels, grad_scale=2.5, lm_head_bias=bb)
        grads.append((*got, bb.grad))
    for a, r in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)


def test_no_grad_mode_returns_the_loss_only():
    h, w, labels = _inputs(17, 1000, torch.float32)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(h, w, labels)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, reference_linear_cross_entropy(h, w, labels).detach(), rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise_clearly():
    h, w, labels = _inputs(4, 1000, torch.float32)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 1000\)"):
        fused_linear_cross_entropy(h, w, torch.tensor([0, 1, 1000, -100], device=DEVICE))
    with pytest.raises(ValueError, match="share a dtype"):
        fused_linear_cross_entropy(h.detach().double(), w, labels)
    with pytest.raises(ValueError, match="labels hold 3 tokens"):
        fused_linear_cross_entropy(h, w, labels[:3])
    with pytest.raises(ValueError, match="with shift=True"):
        fused_linear_cross_entropy(h.reshape(2, 2, HIDDEN), w, labels, shift=True)


def test_second_backward_raises():
    h, w, labels = _inputs(4, 1000, torch.float32)
    loss = fused_linear_cross_entropy(h, w, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="back-propagated once"):
        loss.backward()


@pytest.mark.gpu
def test_gpu_memory_stays_below_full_logits():
    """4096 tokens x 128256 vocab: full fp32 logits would be 2 GiB; the fused loss stays far below."""
    h, w, labels = _inputs(4096, 128256, torch.bfloat16, hidden=1024)
    w.requires_grad_(False)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = fused_linear_cross_entropy(h, w, labels)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 400 * 2**20, f"peak extra memory {extra / 2**20:.0f} MiB"
    ref = reference_linear_cross_entropy(h.detach(), w, labels)  # 2 GiB of logits, after the measurement
    torch.testing.assert_close(loss.detach(), ref, rtol=2e-3, atol=2e-3)
