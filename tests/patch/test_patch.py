"""tuneforge.patch: kernel-backed forwards give transformers' logits, loss and gradients, and stay local.

Reference: the same tiny random model (same seed) left unpatched, in the same process: the
patches live on module instances, so the reference runs transformers' code untouched.

Tolerances. fp32: the kernels differ from PyTorch only in the order of their fp32 sums, so
logits and the loss agree to 1e-5 and every parameter gradient to rtol 1e-4 / atol 1e-6.
bf16: transformers rounds to bf16 after every elementwise op (RoPE, norms, soft-capping) while
the kernels round once from fp32; logits agree to 3% of their scale, the loss to 1%, gradients
to 5% in relative norm (a handful of bf16 roundings of 2^-8 each through two layers).
"""

import logging
import types

import pytest
import torch

from tuneforge.models.families import all_families, get_family
from tuneforge.patch import patch_model
from tuneforge.switches import KERNELS_ENV as DISABLE_ENV
from tuneforge.testing.tiny import TEST_DEVICE as DEVICE, record_rope_calls, tiny_batch, tiny_model
from tuneforge.train.trainer import _has_fused_loss

# Families whose decoder layer calls self_attn without **kwargs (transformers 5): padding-free
# batches cannot hand it cu_seq_lens, so the patch leaves them transformers' mask (tests/patch/test_varlen.py).
NO_VARLEN = {"stablelm"}
KERNEL_FAMILIES = sorted(name for name, spec in all_families().items() if spec.kernels)


def expected_patches(spec) -> list[str]:
    """What the family table promises `patch_model` applies to this family's tiny model."""
    names = ["layer_norm" if spec.norm == "layer" else "rms_norm"]
    if spec.attention == "rope":
        names.append("rope")
        if spec.name not in NO_VARLEN:
            names.append("varlen")
    if spec.mlp is not None:
        names.append("swiglu" if spec.activation == "silu" else "geglu")
    return names + ["fused_cross_entropy"]


def _patched_pair(family, dtype=torch.float32):
    reference = tiny_model(family, dtype=dtype, device=DEVICE)
    ours = tiny_model(family, dtype=dtype, device=DEVICE)
    applied = patch_model(ours, get_family(family), enabled=True)
    return reference, ours, applied


def _instance_forwards(model) -> list[str]:
    return [name for name, module in model.named_modules() if "forward" in vars(module)]


@pytest.mark.parametrize("family", KERNEL_FAMILIES)
def test_patched_forward_loss_and_gradients_equal_transformers_fp32(family):
    reference, ours, applied = _patched_pair(family)
    assert applied == expected_patches(get_family(family))
    assert ours.tuneforge.kernels == applied and _has_fused_loss(ours)
    ids, mask, labels = tiny_batch(device=DEVICE)

    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits,
                                   reference(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)

    expected = reference(input_ids=ids, attention_mask=mask, labels=labels).loss
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None, "with labels the fused loss never forms the logits"
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    expected.backward()
    out.loss.backward()
    for (name, p), q in zip(reference.named_parameters(), ours.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        # A callable msg keeps assert_close's own report (how many elements, the largest errors).
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda report, name=name: f"{name}: {report}")


@pytest.mark.parametrize("family,in_place", [("llama", True), ("qwen3", True), ("olmo2", True), ("phi3", False)])
def test_rope_rotates_q_and_k_in_place_where_autograd_allows(family, in_place, monkeypatch, caplog):
    # Projection outputs (llama), per-head q/k norm outputs (qwen3) and whole-q/k norm outputs
    # (olmo2) are fresh tensors: rotated in their own storage. Phi-3 splits one packed qkv_proj
    # output, so q and k are views that need grad: rotated out of place, said once in the log.
    from tuneforge.patch.modules import LOGGED

    calls = record_rope_calls(monkeypatch)
    LOGGED.discard("rope_views")  # said once per process: forget that an earlier test said it
    _, ours, _ = _patched_pair(family)
    ids, mask, labels = tiny_batch(device=DEVICE)
    with caplog.at_level(logging.INFO, logger="tuneforge.patch"):
        ours(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert calls and set(calls) == {(in_place, in_place)}
    assert caplog.text.count("RoPE out of place") == (0 if in_place else 1)


@pytest.mark.parametrize("family", ["llama", "gemma2", "granite", "cohere"])
def test_num_items_in_batch_sums_the_loss_as_transformers(family):
    # Gradient accumulation: the trainer passes the token count of the whole accumulated batch.
    # Gemma 2 soft-caps the logits, Granite divides them, Cohere multiplies them.
    reference, ours, _ = _patched_pair(family)
    ids, mask, labels = tiny_batch(seed=3, device=DEVICE)
    for n in (5, torch.tensor(37)):
        torch.testing.assert_close(
            ours(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n).loss,
            reference(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n).loss,
            rtol=1e-5, atol=1e-6,
        )


@pytest.mark.parametrize("family", ["llama", "gemma3", "phi3"])
def test_bf16_patched_model_is_close_to_transformers(family):
    reference, ours, _ = _patched_pair(family, dtype=torch.bfloat16)
    ids, mask, labels = tiny_batch(seed=4, device=DEVICE)
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask).logits.float()
        got = ours(input_ids=ids, attention_mask=mask).logits.float()
    assert (got - want).abs().max() <= 0.03 * want.abs().max()
    expected = reference(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss = ours(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss.float(), expected.float(), rtol=1e-2, atol=0)
    expected.backward()
    loss.backward()
    for (name, p), q in zip(reference.named_parameters(), ours.parameters()):
        error = (q.grad.float() - p.grad.float()).norm() / p.grad.float().norm()
        assert error < 0.05, f"{name}: relative gradient error {error:.3f}"


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_generation_is_unchanged(family):
    reference, ours, _ = _patched_pair(family)
    prompt = tiny_batch(batch=1, seq=5, pad=0, device=DEVICE)[0]
    want = reference.generate(prompt, max_new_tokens=4, do_sample=False)
    got = ours.generate(prompt, max_new_tokens=4, do_sample=False)
    assert got.shape == (1, 9) and torch.equal(got, want)


def test_patches_stay_on_the_patched_instance():
    # The tests above compare patched and unpatched models in one process: a class-level or
    # module-global patch would silently turn every later reference into a patched model.
    _, ours, _ = _patched_pair("llama")
    later = tiny_model("llama", device=DEVICE)
    assert _instance_forwards(later) == [] and "tuneforge" not in vars(later)
    patched = set(_instance_forwards(ours))
    assert {"model.layers.0.self_attn", "model.layers.1.mlp", "model.norm"} <= patched
    assert "forward" in vars(ours), "the CausalLM forward is an instance attribute"
    assert isinstance(ours.forward, types.MethodType) and ours.forward.__self__ is ours
    # Patching adds no tensors: checkpoints of patched and unpatched models are the same.
    assert ours.state_dict().keys() == later.state_dict().keys()


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_switch_turns_every_patch_off(how, monkeypatch, caplog):
    model = tiny_model("llama", device=DEVICE)
    if how == "environment":
        monkeypatch.setenv(DISABLE_ENV, "1")
    with caplog.at_level(logging.INFO, logger="tuneforge.patch"):
        applied = patch_model(model, get_family("llama"), enabled=False if how == "argument" else None)
    assert applied == [] and model.tuneforge.kernels == [] and _instance_forwards(model) == []
    assert "kernels off" in caplog.text
    # An explicit use_kernels=True wins over the environment.
    assert patch_model(tiny_model("llama", device=DEVICE), get_family("llama"), enabled=True)


def test_cpu_without_triton_interpreter_keeps_the_plain_path(monkeypatch, caplog):
    monkeypatch.setattr("tuneforge.patch.TRITON_INTERPRETER", False)  # as in a process started without it
    model = tiny_model("llama", device="cpu")
    with caplog.at_level(logging.INFO, logger="tuneforge.patch"):
        assert patch_model(model, get_family("llama"), enabled=True) == []
    assert "need a CUDA device" in caplog.text and _instance_forwards(model) == []


def test_family_without_kernels_logs_and_keeps_the_plain_path(caplog):
    spec = get_family("llama")
    plain = type(spec)(**{**vars(spec), "name": "plain-llama", "kernels": False})
    model = tiny_model("llama", device=DEVICE)
    with caplog.at_level(logging.INFO, logger="tuneforge.patch"):
        assert patch_model(model, plain, enabled=True) == []
    assert "plain-llama has no proven kernel patches" in caplog.text


def test_attention_with_an_undescribed_qk_norm_is_left_alone(caplog):
    # StableLM's optional per-head q/k LayerNorm is not in the family layout: its attention must
    # stay transformers' (the norms, MLP and loss are still patched), and the model stays exact.
    reference = tiny_model("stablelm", qk_layernorm=True, device=DEVICE)
    ours = tiny_model("stablelm", qk_layernorm=True, device=DEVICE)
    with caplog.at_level(logging.INFO, logger="tuneforge.patch"):
        applied = patch_model(ours, get_family("stablelm"), enabled=True)
    assert "rope" not in applied and "qk_layernorm" in caplog.text
    ids, mask, _ = tiny_batch(device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits,
                                   reference(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)


SOFTCAP_FAMILIES = sorted(name for name in KERNEL_FAMILIES if get_family(name).attn_softcap)


@pytest.mark.parametrize("family", SOFTCAP_FAMILIES)
def test_unpadded_batch_runs_the_softcap_kernel_and_equals_transformers(family, monkeypatch):
    """No attention_mask: the causal-LM forward marks the batch unpadded and every layer's
    soft-capped attention runs kernels/softcap_attention (spied), with transformers' eager loss
    and gradients (fp32: rtol 1e-5 / 1e-4). A padded batch, or the switch off, keeps transformers'."""
    import tuneforge.patch.attention as patch_attention

    calls = []
    real = patch_attention.dense_softcap_attention
    monkeypatch.setattr(patch_attention, "dense_softcap_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    reference, ours, _ = _patched_pair(family)
    assert all(plan.softcap_kernel for plan in ours.tuneforge.plans.values() if hasattr(plan, "softcap_kernel"))
    ids, mask, _ = tiny_batch(device=DEVICE)
    labels = ids.clone()
    expected = reference(input_ids=ids, labels=labels).loss
    out = ours(input_ids=ids, labels=labels)
    layers = ours.config.num_hidden_layers
    assert len(calls) == layers
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    expected.backward()
    out.loss.backward()
    for (name, p), q in zip(reference.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda report, name=name: f"{name}: {report}")
    ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert len(calls) == layers  # a mask: transformers' eager attention
    monkeypatch.setenv("TUNEFORGE_SOFTCAP_KERNEL", "0")  # resolved when the next model is patched
    _, plain, _ = _patched_pair(family)
    assert not any(getattr(plan, "softcap_kernel", False) for plan in plain.tuneforge.plans.values())
    torch.testing.assert_close(plain(input_ids=ids, labels=labels).loss, expected, rtol=1e-5, atol=1e-6)
    assert len(calls) == layers
