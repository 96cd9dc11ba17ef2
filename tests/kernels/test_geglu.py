"""GeGLU kernel: gelu(gate) * up (erf or tanh gelu), forward and backward, vs reference and Gemma's MLP.

Tolerances (relative error ||out - ref|| / ||ref||):
- fp32 1e-5: the kernel computes in fp32 like the reference; erf/exp/sigmoid rounding differs
  slightly (the kernel's tanh is 2 sigmoid(2z) - 1), ~1e-7 observed.
- bf16 1e-2: the reference rounds gelu(gate) to bf16 before the product, the kernel rounds once;
  the CPU interpreter truncates fp32 -> bf16 casts. One or two bf16 ulps (2^-8 relative).
"""

import pytest
import torch
from transformers import GemmaConfig
from transformers.activations import ACT2FN
from transformers.models.gemma.modeling_gemma import GemmaMLP

from kernel_checks import assert_gradients_match, check_gated_against_reference, check_mlp_with_kernel, rel_err
from tuneforge.kernels.geglu import geglu, reference_geglu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
SHAPES = [(1, 64), (17, 97), (2, 17, 1000)]
# transformers' activation name for each approximation.
HF_ACT = {"none": "gelu", "tanh": "gelu_pytorch_tanh"}


def gate_up(shape, dtype, scale=1.0):
    gate = (scale * torch.randn(shape, device=DEVICE)).to(dtype).requires_grad_()
    return gate, torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_reference(shape, dtype, approximate):
    check_gated_against_reference(
        lambda g, u: geglu(g, u, approximate), lambda g, u: reference_geglu(g, u, approximate),
        *gate_up(shape, dtype), TOL[dtype],
    )


# numpy (the CPU interpreter) warns when exp overflows to inf; the sigmoid is still exactly 0 there.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_large_gate_values_stay_finite_and_exact(approximate):
    # |gate| up to ~100: erf and tanh saturate, gelu'(a) must go to 1 and 0 without NaN.
    gate, up = gate_up((17, 97), torch.float32, scale=30.0)
    y, ref = geglu(gate, up, approximate), reference_geglu(gate, up, approximate)
    assert rel_err(y, ref) < TOL[torch.float32]
    assert_gradients_match(y, ref, (gate, up), TOL[torch.float32])


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_reference_is_transformers_activation(approximate):
    gate, up = torch.randn(2, 17, 97, device=DEVICE), torch.randn(2, 17, 97, device=DEVICE)
    assert torch.equal(reference_geglu(gate, up, approximate), ACT2FN[HF_ACT[approximate]](gate) * up)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_inside_gemma_mlp_matches_transformers(dtype):
    # Gemma's MLP is the tanh GeGLU (GemmaConfig even rewrites a legacy hidden_act="gelu" to it).
    config = GemmaConfig(hidden_size=64, intermediate_size=97, hidden_act="gelu_pytorch_tanh")
    check_mlp_with_kernel(GemmaMLP(config).to(DEVICE, dtype), lambda g, u: geglu(g, u, "tanh"), dtype, TOL[dtype])


def test_backward_keeps_only_gate_and_up():
    # gelu(gate) is recomputed in the backward pass: nothing but the two inputs is saved.
    gate, up = gate_up((17, 97), torch.float32)
    y = geglu(gate, up, "tanh")  # keep the output alive: its graph owns the saved tensors
    saved = y.grad_fn.saved_tensors
    assert [t.data_ptr() for t in saved] == [gate.data_ptr(), up.data_ptr()]


def test_bad_arguments_raise():
    gate, up = gate_up((4, 8), torch.float32)
    with pytest.raises(ValueError, match="approximate must be one of"):
        geglu(gate, up, "sigmoid")
    with pytest.raises(ValueError, match="same shape and dtype"):
        geglu(gate, up.detach().to(torch.bfloat16))
