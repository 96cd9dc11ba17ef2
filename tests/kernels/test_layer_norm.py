"""LayerNorm kernel: forward and backward (dX, dW, dB) equal the reference and nn.LayerNorm.

Tolerances (relative error ||out - ref|| / ||ref||):
- fp32 1e-5: only reduction order and rsqrt rounding differ (~1e-7 observed).
- bf16 1e-2: one or two bf16 roundings (2^-8 relative each) land differently; the CPU
  interpreter truncates fp32 -> bf16 casts, so its errors are one-sided.
"""

import pytest
import torch

from tuneforge.kernels.layer_norm import layer_norm, reference_layer_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
SHAPES = [((1,), 64), ((17,), 97), ((33,), 576), ((2, 17), 1000)]


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def make_inputs(lead, hidden, dtype, with_bias):
    # A non-zero mean in x exercises the centring; weights around 1, bias around 0.
    x = (torch.randn(*lead, hidden, device=DEVICE) + 0.5).to(dtype).requires_grad_()
    w = (1.0 + 0.1 * torch.randn(hidden, device=DEVICE)).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(hidden, device=DEVICE)).to(dtype).requires_grad_() if with_bias else None
    return x, w, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("lead,hidden", SHAPES)
def test_forward_and_backward_match_reference(lead, hidden, with_bias, dtype):
    x, w, b = make_inputs(lead, hidden, dtype, with_bias)
    y = layer_norm(x, w, b, 1e-5)
    ref = reference_layer_norm(x, w, b, 1e-5)
    assert y.shape == x.shape and y.dtype == dtype
    assert rel_err(y, ref) < TOL[dtype]

    inputs = (x, w, b) if with_bias else (x, w)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, dy)
    grads_ref = torch.autograd.grad(ref, inputs, dy)
    for g, g_ref, t in zip(grads, grads_ref, inputs):
        assert g.dtype == t.dtype
        assert rel_err(g, g_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_and_reference_match_nn_layer_norm(dtype):
    hidden = 576
    module = torch.nn.LayerNorm(hidden, eps=1e-5).to(DEVICE, dtype)
    with torch.no_grad():
        module.weight.copy_(1.0 + 0.1 * torch.randn(hidden))
        module.bias.copy_(0.1 * torch.randn(hidden))
    x = (torch.randn(2, 17, hidden, device=DEVICE) + 0.5).to(dtype).requires_grad_()
    y_mod = module(x)
    assert rel_err(reference_layer_norm(x, module.weight, module.bias, 1e-5), y_mod) < TOL[dtype]
    y = layer_norm(x, module.weight, module.bias, 1e-5)
    assert rel_err(y, y_mod) < TOL[dtype]

    params = (x, module.weight, module.bias)
    dy = torch.randn_like(y)
    for g, g_mod in zip(torch.autograd.grad(y, params, dy), torch.autograd.grad(y_mod, params, dy)):
        assert rel_err(g, g_mod) < TOL[dtype]


def test_frozen_parameters_get_no_gradient():
    x, w, b = make_inputs((17,), 97, torch.float32, True)
    w.requires_grad_(False)
    b.requires_grad_(False)
    y = layer_norm(x, w, b)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, (x,), dy)
    (dx_ref,) = torch.autograd.grad(reference_layer_norm(x, w, b), (x,), dy)
    assert rel_err(dx, dx_ref) < TOL[torch.float32]


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(4, 64, device=DEVICE)
    w = torch.ones(64, device=DEVICE)
    with pytest.raises(ValueError, match=r"bias must have shape \(64,\)"):
        layer_norm(x, w, torch.zeros(65, device=DEVICE))
    with pytest.raises(ValueError, match=r"weight must have shape \(64,\)"):
        layer_norm(x, torch.ones(2, 64, device=DEVICE))
