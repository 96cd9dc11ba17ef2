"""Gradient checkpointing: standard and offloaded give the gradients of no checkpointing, and the
offloaded mode keeps nothing per decoder layer but its input."""

import functools
import logging
from unittest import mock

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tuneforge.testing import tiny_model
from tuneforge.patch.activation_checkpointing import (
    LayerInputOffloader,
    enable_gradient_checkpointing,
    offloaded_checkpoint,
    resolve_mode,
)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, SEQ = 2, 16


def lora_model(lora_dropout=0.0, **model_overrides):
    """A tiny Llama with LoRA on all projections; lora_B perturbed so every adapter has a gradient."""
    model = tiny_model("llama", **model_overrides)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=lora_dropout, target_modules=LORA_TARGETS))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=generator)
    return model.train()


def batch(seq=SEQ):
    return torch.randint(0, 317, (BATCH, seq), generator=torch.Generator().manual_seed(2))


def loss_and_grads(model, mode, *, seed=5):
    if mode != "none":
        enable_gradient_checkpointing(model, mode)
    ids = batch()
    torch.manual_seed(seed)  # the dropout masks
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_grads_close(actual, expected, rtol=1e-6):
    assert actual.keys() == expected.keys()
    for name, reference in expected.items():
        scale = reference.abs().max()
        assert scale > 0, f"{name}: zero reference gradient, the comparison would prove nothing"
        torch.testing.assert_close(actual[name], reference, rtol=rtol, atol=rtol * scale, msg=name)


@pytest.mark.parametrize(
    "mode, expected",
    [(True, "standard"), ("standard", "standard"), ("offload", "offload"), ("unsloth", "offload"), (False, None)],
)
def test_mode_names(mode, expected):
    assert resolve_mode(mode) == expected


@pytest.mark.parametrize("mode", [1, 0, None, "Unsloth", "offloaded", "true"])
def test_bad_mode_names_say_what_to_write(mode):
    with pytest.raises(ValueError, match='"offload"'):
        resolve_mode(mode)


@pytest.mark.parametrize("lora_dropout", [0.0, 0.1])
@pytest.mark.parametrize("mode", [True, "offload", "unsloth"])
def test_lora_gradients_equal_no_checkpointing(mode, lora_dropout):
    reference_loss, reference = loss_and_grads(lora_model(lora_dropout), "none")
    loss, grads = loss_and_grads(lora_model(lora_dropout), mode)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-6, atol=0)
    assert_grads_close(grads, reference)
    if lora_dropout:
        # The dropout masks must matter, or replaying them would be untested: another seed's masks
        # give other gradients.
        _, other_masks = loss_and_grads(lora_model(lora_dropout), "none", seed=6)
        name = next(iter(reference))
        assert not torch.allclose(other_masks[name], reference[name], rtol=1e-3)


def test_full_finetune_without_peft_equals_no_checkpointing():
    reference_loss, reference = loss_and_grads(tiny_model("llama").train(), "none")
    loss, grads = loss_and_grads(tiny_model("llama").train(), "offload")
    torch.testing.assert_close(loss, reference_loss, rtol=1e-6, atol=0)
    assert_grads_close(grads, reference, rtol=1e-5)


@pytest.mark.parametrize("mode", [True, "offload"])
def test_first_layer_gets_lora_gradients_when_its_input_needs_no_grad(mode):
    """Frozen embeddings give layer 0 an input without requires_grad; its LoRA weights must still learn.
    (transformers hooks the embeddings to force requires_grad; we remove that hook to prove we
    do not depend on it.)"""
    _, reference = loss_and_grads(lora_model(), "none")
    model = lora_model()
    enable_gradient_checkpointing(model, mode)
    model.get_base_model().disable_input_require_grads()
    layer_inputs = []
    first = model.get_base_model().model.layers[0]
    first.register_forward_pre_hook(lambda module, args: layer_inputs.append(args[0].requires_grad))
    _, grads = loss_and_grads(model, "none")
    assert layer_inputs[0] is False
    assert_grads_close(grads, reference)


def _saved_tensor_census(model, mode):
    """Run forward and backward; return the bytes autograd saved through saved_tensors_hooks
    {"outside": outside decoder layers, "inside": inside them}, each layer's input, and the tensors
    given to LayerInputOffloader.pack. With checkpointing, saves are attributed to "outside" as the
    layer hooks run outside checkpoint in some transformers versions and inside it in others."""
    layers = model.get_base_model().model.layers
    inside = [False]
    layer_inputs = []

    def enter(module, args):
        inside[0] = mode == "none"
        layer_inputs.append(args[0].detach().clone())

    def leave(module, args, output):
        inside[0] = False

    for layer in layers:
        layer.register_forward_pre_hook(enter)
        layer.register_forward_hook(leave)

    if mode != "none":
        enable_gradient_checkpointing(model, mode)
    saved = {"outside": 0, "inside": 0}

    def count(tensor):
        saved["inside" if inside[0] else "outside"] += tensor.numel() * tensor.element_size()
        return tensor

    offloaded = []
    real_pack = LayerInputOffloader.pack

    def recording_pack(self, tensor):
        offloaded.append(tensor.detach().clone())
        return real_pack(self, tensor)

    ids = batch()
    with mock.patch.object(LayerInputOffloader, "pack", recording_pack):
        with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
            loss = model(input_ids=ids, labels=ids).loss
    loss.backward()  # the graph built under the census still trains
    # Recomputation runs the layers again (forward hooks too); keep the forward pass's inputs only.
    return saved, layer_inputs[: len(layers)], offloaded


def test_offload_saves_only_the_layer_inputs():
    plain, layer_inputs, _ = _saved_tensor_census(lora_model(), "none")
    standard, _, _ = _saved_tensor_census(lora_model(), "standard")
    offload, _, offloaded = _saved_tensor_census(lora_model(), "offload")

    input_bytes = sum(x.numel() * x.element_size() for x in layer_inputs)
    assert len(layer_inputs) == 2
    # Our hooks get exactly the layer inputs, once each ...
    assert len(offloaded) == len(layer_inputs)
    for given, layer_input in zip(offloaded, layer_inputs):
        torch.testing.assert_close(given, layer_input, rtol=0, atol=0)
    # ... and nothing else of the layers' reaches autograd's saved tensors: the rest of the model
    # saves what it saves without checkpointing, and standard checkpointing saves the same plus the
    # layer inputs (which it keeps on the device).
    assert offload["outside"] == plain["outside"]
    assert standard["outside"] == plain["outside"] + input_bytes
    # Without checkpointing the layers save far more than their inputs (here > 20x).
    assert plain["inside"] > 20 * input_bytes


@pytest.mark.parametrize("hidden_as_keyword", [False, True])
def test_offloaded_checkpoint_takes_the_hidden_state_positionally_or_by_keyword(hidden_as_keyword):
    """Layers may be called as layer(x, mask=...) or layer(hidden_states=x, mask=...); either way only x is
    handed to the offloader, and the other tensors (shared by all layers) are not copied."""
    weight = torch.randn(8, 8, requires_grad=True)
    scale = torch.randn(8, requires_grad=True)  # a keyword tensor that needs a gradient too

    def layer(hidden_states, scale):
        return torch.tanh(hidden_states @ weight) * scale

    x = torch.randn(3, 8)
    expected = layer(x, scale).square().sum()
    expected_grads = torch.autograd.grad(expected, [weight, scale])

    packed = []
    offloader = LayerInputOffloader()
    real_pack = offloader.pack
    offloader.pack = lambda tensor: packed.append(tensor) or real_pack(tensor)
    if hidden_as_keyword:
        out = offloaded_checkpoint(functools.partial(layer, hidden_states=x, scale=scale), offloader=offloader)
    else:
        out = offloaded_checkpoint(functools.partial(layer, scale=scale), x, offloader=offloader)
    grads = torch.autograd.grad(out.square().sum(), [weight, scale])

    assert len(packed) == 1 and packed[0] is x
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_cpu_path_is_logged_once(caplog):
    with caplog.at_level(logging.INFO, logger="tuneforge.patch.activation_checkpointing"):
        loss_and_grads(lora_model(), "offload")
    paths = [r.getMessage() for r in caplog.records if "kept in place" in r.getMessage()]
    assert len(paths) == 1 and "no CUDA device" in paths[0]
    assert any("offload (2 decoder layers" in r.getMessage() for r in caplog.records)


def test_disable_turns_checkpointing_off():
    model = lora_model()
    layers = model.get_base_model().model.layers
    assert enable_gradient_checkpointing(model, "unsloth") == "offload"
    assert all(layer.gradient_checkpointing for layer in layers)
    assert enable_gradient_checkpointing(model, False) is None
    assert not any(layer.gradient_checkpointing for layer in layers)


def test_rejects_models_that_are_not_transformers_models():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2), "offload")


def _peak_cuda_bytes(model, mode, ids):
    enable_gradient_checkpointing(model, mode)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.manual_seed(5)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.cuda.synchronize()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return torch.cuda.max_memory_allocated() - base, loss.detach(), grads


@pytest.mark.gpu
def test_offload_uses_pinned_memory_and_lowers_peak_cuda_memory():
    # Many thin layers and a long sequence: the layer inputs (32 x 8192 x 128 x 4 B = 128 MiB) are
    # what standard checkpointing keeps on the GPU; one layer's recomputation needs less than that.
    shape = dict(num_hidden_layers=32, hidden_size=128, intermediate_size=256, max_position_embeddings=8192)
    ids = torch.randint(0, 317, (1, 8192), generator=torch.Generator().manual_seed(2)).cuda()
    peak_standard, loss_standard, grads_standard = _peak_cuda_bytes(lora_model(**shape).cuda(), True, ids)

    entries = []
    real_pack = LayerInputOffloader.pack

    def recording_pack(self, tensor):
        entries.append(real_pack(self, tensor))
        return entries[-1]

    with mock.patch.object(LayerInputOffloader, "pack", recording_pack):
        peak_offload, loss, grads = _peak_cuda_bytes(lora_model(**shape).cuda(), "offload", ids)

    assert len(entries) == 32
    assert all(entry.cpu.device.type == "cpu" and entry.cpu.is_pinned() for entry in entries)
    input_bytes = 32 * 8192 * 128 * 4
    assert peak_offload < peak_standard - 0.75 * input_bytes, (peak_offload, peak_standard)
    torch.testing.assert_close(loss, loss_standard, rtol=1e-5, atol=0)
    assert_grads_close(grads, grads_standard, rtol=1e-4)


@pytest.mark.gpu
def test_offload_on_gpu_supports_a_second_backward_through_the_same_graph():
    """retain_graph=True unpacks every layer input twice: the CPU copy must still be there and be
    brought back again (the first backward took the GPU copy)."""
    model = lora_model().cuda()
    _, once = _peak_cuda_bytes(model, "offload", batch().cuda())[1:]
    model.zero_grad()
    ids = batch().cuda()
    torch.manual_seed(5)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward(retain_graph=True)
    loss.backward()
    twice = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert_grads_close(twice, {n: 2 * g for n, g in once.items()}, rtol=1e-5)


@pytest.mark.parametrize("mode", ["offload", "standard", "none"])
def test_training_arguments_do_not_replace_offloaded_checkpointing(mode, caplog):
    """SFTConfig(gradient_checkpointing=True) would make the Trainer re-enable transformers' own
    checkpointing over the offloaded one; the trainer keeps ours and says so."""
    from types import SimpleNamespace

    from tuneforge.patch.activation_checkpointing import active_mode, keep_offloaded_checkpointing

    model = lora_model()
    if mode != "none":
        enable_gradient_checkpointing(model, mode)
    assert active_mode(model) == (None if mode == "none" else mode)
    args = SimpleNamespace(gradient_checkpointing=True)
    with caplog.at_level(logging.WARNING, logger="tuneforge.patch.activation_checkpointing"):
        keep_offloaded_checkpointing(model, args)
    assert args.gradient_checkpointing is (mode != "offload")
    assert ("keeping the offloaded one" in caplog.text) is (mode == "offload")
    assert active_mode(model) == (None if mode == "none" else mode)
