"""SwiGLU kernel: silu(gate) * up, forward and backward, vs the reference and transformers' MLP.

Tolerances (relative error ||out - ref|| / ||ref||):
- fp32 1e-5: the kernel computes in fp32 like the reference; only exp/sigmoid rounding differs.
- bf16 1e-2: the reference rounds silu(gate) to bf16 before the product, the kernel rounds once;
  the CPU interpreter truncates fp32 -> bf16 casts, so its errors are one-sided. Either way
  one or two bf16 ulps (2^-8 relative).
"""

import pytest
import torch
from transformers import LlamaConfig
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaMLP

from kernel_checks import check_gated_against_reference, check_mlp_with_kernel
from tuneforge.kernels.swiglu import reference_swiglu, swiglu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# Any shape works (the kernel is flat); odd sizes leave a masked tail in the last block.
SHAPES = [(1, 64), (17, 97), (33, 576), (2, 17, 1000)]


def check_against_reference(shape, dtype, scale=1.0):
    gate = (scale * torch.randn(shape, device=DEVICE)).to(dtype).requires_grad_()
    up = torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True)
    check_gated_against_reference(swiglu, reference_swiglu, gate, up, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_reference(shape, dtype):
    check_against_reference(shape, dtype)


# numpy (the CPU interpreter) warns when exp(-a) overflows to inf; sigmoid is still exactly 0 there.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_large_gate_values_stay_finite_and_exact():
    # |gate| up to ~100: sigmoid saturates; silu'(a) must go to 1 and 0, not NaN.
    check_against_reference((17, 97), torch.float32, scale=30.0)


def test_large_tensor_uses_the_wide_block_path():
    # >= 2^20 elements switches to 4096-element blocks; the tail block is partial.
    check_against_reference((1, (1 << 20) + 3), torch.float32)


def test_reference_is_transformers_activation():
    gate, up = torch.randn(2, 17, 97, device=DEVICE), torch.randn(2, 17, 97, device=DEVICE)
    assert torch.equal(reference_swiglu(gate, up), ACT2FN["silu"](gate) * up)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_inside_llama_mlp_matches_transformers(dtype):
    config = LlamaConfig(hidden_size=64, intermediate_size=97, hidden_act="silu")
    check_mlp_with_kernel(LlamaMLP(config).to(DEVICE, dtype), swiglu, dtype, TOL[dtype])


def test_backward_keeps_only_gate_and_up():
    # silu(gate) is recomputed in the backward pass: nothing but the two inputs is saved.
    gate = torch.randn(17, 97, device=DEVICE, requires_grad=True)
    up = torch.randn(17, 97, device=DEVICE, requires_grad=True)
    y = swiglu(gate, up)  # keep the output alive: its graph owns the saved tensors
    saved = y.grad_fn.saved_tensors
    assert [t.data_ptr() for t in saved] == [gate.data_ptr(), up.data_ptr()]


def test_mismatched_inputs_raise():
    with pytest.raises(ValueError, match="same shape and dtype"):
        swiglu(torch.randn(4, 8, device=DEVICE), torch.randn(4, 9, device=DEVICE))
