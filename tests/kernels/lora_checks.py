"""Helpers shared by the fused-LoRA tests (imported by name: pytest puts this folder on sys.path).

peft is the reference: its LoRA layers wrap the same base (a plain Linear, or a bitsandbytes
Linear4bit NF4 with double quantisation and an fp32 compute dtype, the CPU setting), with random
A and B (init_lora_weights=False, so dA is not trivially zero).

Tolerances (`assert_close`): fp32 agrees to float rounding of differently ordered sums (rtol 1e-4,
atol 1e-5). bf16: peft runs the adapter in fp32 (its adapters are fp32 under a bf16 model) while
the fused ops run it in bf16; results agree to 2% in relative norm (a few bf16 roundings, 2^-8 each).
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model

from tuneforge.testing.bitsandbytes import exact_on_this_cpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HIDDEN_ACT = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}


def to_4bit(linear: nn.Linear) -> nn.Module:
    """A bitsandbytes NF4 (double-quantised) copy of `linear`, fp32 compute."""
    q = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True,
    )
    q.weight = bnb.nn.Params4bit(linear.weight.data.float().cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.float().cpu(), requires_grad=False)
    # The odd sizes here (o_proj's 48 inputs, down's 176) are not whole blocks of 64 per row, which
    # bitsandbytes' AVX512 CPU dequantisation gets wrong (issue 14): on such a CPU the reference
    # multiplies by the NF4 formula instead, as tuneforge's loader does; elsewhere by bitsandbytes.
    return exact_on_this_cpu(q.to(DEVICE))


class Attention(nn.Module):
    """Q/K/V/O of odd sizes: hidden 72, q 48, k/v 24 (GQA-like)."""

    def __init__(self, base: str, bias: bool):
        super().__init__()
        make = (lambda i, o: to_4bit(nn.Linear(i, o, bias=bias))) if base == "nf4" else (lambda i, o: nn.Linear(i, o, bias=bias))
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = make(72, 48), make(72, 24), make(72, 24), make(48, 72)


def peft_wrap(model, targets, r, dtype=torch.float32, rslora=False, **config):
    model = model.to(DEVICE)
    if dtype != torch.float32:
        model = model.to(dtype)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, use_rslora=rslora,
                        **config)
    return get_peft_model(model, config).base_model.model


def lora_params(*layers):
    return [p for layer in layers if hasattr(layer, "lora_A") for p in (layer.lora_A.default.weight, layer.lora_B.default.weight)]


def outputs_and_grads(fn, x, params, seed=1):
    """fn(x) as a tuple, and the grads of x and params for fixed random output grads."""
    x = x.detach().clone().requires_grad_()
    for p in params:
        p.grad = None
    ys = fn(x)
    ys = ys if isinstance(ys, tuple) else (ys,)
    g = torch.Generator().manual_seed(seed)
    dys = [torch.randn(y.shape, generator=g).to(y.device, y.dtype) for y in ys]
    torch.autograd.backward(ys, dys)
    return [y.detach() for y in ys], [x.grad] + [p.grad.clone() for p in params]


def assert_close(got, want, dtype):
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        else:
            rel = ((a.float() - b.float()).norm() / b.float().norm()).item()
            assert rel < 2e-2, rel
