"""The fused LoRA ops give peft's outputs and gradients (dX, dA, dB) on dense and NF4 bases.

peft is the reference: its LoRA layers wrap the same base (a plain Linear, or a bitsandbytes
Linear4bit NF4 with double quantisation and an fp32 compute dtype, the CPU setting), with
random A and B (init_lora_weights=False, so dA is not trivially zero).

Tolerances: fp32 agrees to float rounding of differently ordered sums (rtol 1e-4, atol 1e-5).
bf16: peft runs the adapter in fp32 (its adapters are fp32 under a bf16 model) while the fused op
runs it in bf16; results agree to 2% in relative norm (a few bf16 roundings, 2^-8 each).
"""

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model

from tuneforge.kernels.lora import reference_lora_linear, reference_lora_mlp, reference_lora_qkv
from tuneforge.lora.projections import lora_linear, lora_mlp, lora_qkv, projection_of
from tuneforge.testing import tiny_model

from lora_checks import (
    DEVICE,
    HIDDEN_ACT,
    Attention,
    assert_close,
    lora_params,
    outputs_and_grads,
    peft_wrap,
    to_4bit,
)


@pytest.mark.parametrize(
    "base,dtype,r,bias",
    [
        ("dense", torch.float32, 8, True),
        ("dense", torch.float32, 16, False),
        ("dense", torch.bfloat16, 8, True),
        ("nf4", torch.float32, 8, True),
        ("nf4", torch.float32, 16, False),
    ],
    ids=["dense-fp32-r8-bias", "dense-fp32-r16", "dense-bf16-r8-bias", "nf4-fp32-r8-bias", "nf4-fp32-r16"],
)
def test_linear_matchespeft_wrap(base, dtype, r, bias):
    attn = peft_wrap(Attention(base, bias), ["o_proj"], r, dtype, rslora=(r == 16))
    x = torch.randn(3, 5, 48, device=DEVICE, dtype=dtype)
    params = lora_params(attn.o_proj)
    got = outputs_and_grads(lambda t: lora_linear(t, attn.o_proj), x, params)
    want = outputs_and_grads(attn.o_proj, x, params)
    assert_close(got[0] + got[1], want[0] + want[1], dtype)
    # The plain-PyTorch reference agrees too.
    ref = outputs_and_grads(lambda t: reference_lora_linear(t, projection_of(attn.o_proj)), x, params)
    assert_close(got[0] + got[1], ref[0] + ref[1], dtype)


@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_qkv_matches_peft_with_k_not_adapted(base):
    """peft's default Llama targets are q and v only: K runs through its base alone."""
    attn = peft_wrap(Attention(base, bias=True), ["q_proj", "v_proj"], 8)
    x = torch.randn(2, 7, 72, device=DEVICE)
    params = lora_params(attn.q_proj, attn.v_proj)
    got = outputs_and_grads(lambda t: lora_qkv(t, attn.q_proj, attn.k_proj, attn.v_proj), x, params)
    want = outputs_and_grads(lambda t: (attn.q_proj(t), attn.k_proj(t), attn.v_proj(t)), x, params)
    assert_close(got[0] + got[1], want[0] + want[1], torch.float32)
    projections = [projection_of(layer) for layer in (attn.q_proj, attn.k_proj, attn.v_proj)]
    ref = outputs_and_grads(lambda t: reference_lora_qkv(t, projections), x, params)
    assert_close(got[0] + got[1], ref[0] + ref[1], torch.float32)


@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_qkv_saves_x_once_and_no_dense_weight(base):
    """X once and the small X A^T products; NF4 bases run as one group (one [T, 3r] product)."""
    attn = peft_wrap(Attention(base, bias=False), ["q_proj", "k_proj", "v_proj"], 8)
    x = torch.randn(2, 7, 72, device=DEVICE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        lora_qkv(x, attn.q_proj, attn.k_proj, attn.v_proj)
    want = [(14, 72), (14, 24)] if base == "nf4" else [(14, 72), (14, 8), (14, 8), (14, 8)]
    assert sorted(saved) == sorted(want)


@pytest.mark.parametrize(
    "activation,dtype,base",
    [
        ("silu", torch.float32, "dense"),
        ("gelu_tanh", torch.float32, "dense"),
        ("gelu", torch.float32, "dense"),
        ("silu", torch.bfloat16, "dense"),
        ("gelu_tanh", torch.bfloat16, "dense"),
        ("silu", torch.float32, "nf4"),
    ],
)
def test_mlp_matches_peft_llama_mlp(activation, dtype, base):
    """lora_mlp on a tiny Llama MLP (hidden 64, intermediate 176) with peft LoRA on gate/up/down."""
    model = tiny_model("llama", hidden_act=HIDDEN_ACT[activation])
    mlp = model.model.layers[0].mlp
    if base == "nf4":
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(mlp, name, to_4bit(getattr(mlp, name)))
    r = 16 if dtype == torch.float32 else 8
    peft_model = peft_wrap(model, ["gate_proj", "up_proj", "down_proj"], r, dtype)
    mlp = peft_model.model.layers[0].mlp
    x = torch.randn(2, 9, 64, device=DEVICE, dtype=dtype)
    params = lora_params(mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    layers = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    got = outputs_and_grads(lambda t: lora_mlp(t, *layers, activation=activation), x, params)
    want = outputs_and_grads(mlp, x, params)
    assert_close(got[0] + got[1], want[0] + want[1], dtype)
    projections = [projection_of(layer) for layer in layers]
    ref = outputs_and_grads(lambda t: reference_lora_mlp(t, *projections, activation), x, params)
    assert_close(got[0] + got[1], ref[0] + ref[1], dtype)


def test_mlp_under_autocast_matchespeft_wrap():
    """An fp32 model trained under bf16 autocast: the fused MLP computes in bf16 like peft's layers."""
    peft_model = peft_wrap(tiny_model("llama"), ["gate_proj", "up_proj", "down_proj"], 8)
    mlp = peft_model.model.layers[0].mlp
    layers = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    x = torch.randn(2, 9, 64, device=DEVICE)
    params = lora_params(*layers)

    def under_autocast(fn):
        def run(t):
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                return fn(t)
        return run

    got = outputs_and_grads(under_autocast(lambda t: lora_mlp(t, *layers)), x, params)
    want = outputs_and_grads(under_autocast(mlp), x, params)
    assert got[0][0].dtype == torch.bfloat16 and got[1][0].dtype == torch.float32
    assert_close(got[0] + got[1], want[0] + want[1], torch.bfloat16)


def test_unsupported_adapters_raise_clearly():
    attn = get_peft_model(Attention("dense", False).to(DEVICE), LoraConfig(r=4, target_modules=["o_proj"], lora_dropout=0.1))
    attn.train()
    x = torch.randn(2, 48, device=DEVICE)
    with pytest.raises(ValueError, match="lora_dropout=0.1"):
        lora_linear(x, attn.base_model.model.o_proj)
    attn.eval()  # dropout is the identity in eval mode
    torch.testing.assert_close(lora_linear(x, attn.base_model.model.o_proj), attn.base_model.model.o_proj(x))

    dora = get_peft_model(Attention("dense", False).to(DEVICE), LoraConfig(r=4, target_modules=["o_proj"], use_dora=True))
    with pytest.raises(NotImplementedError, match="variant"):
        lora_linear(x, dora.base_model.model.o_proj)

    trainable_base = nn.Linear(48, 16).to(DEVICE)
    with pytest.raises(ValueError, match="requires grad"):
        lora_linear(x, trainable_base)
    with pytest.raises(ValueError, match="activation must be one of"):
        lora_mlp(x, trainable_base, trainable_base, trainable_base, activation="relu")
