"""RMSNorm kernel: forward and backward equal the PyTorch reference and transformers' modules.

Tolerances (relative error ||out - ref|| / ||ref||):
- fp32 1e-5: kernel and reference differ only in reduction order and rsqrt rounding (~1e-7
  observed); a wrong formula or cast order shows up at 1e-3 or more.
- bf16 1e-2: one or two bf16 roundings (2^-8 relative each) land differently. Under the CPU
  interpreter (triton 3.9) fp32 -> bf16 casts truncate instead of rounding to nearest, so
  errors there are one-sided and about twice the GPU's.
"""

import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from kernel_checks import assert_gradients_match, rel_err, use_switches
from tuneforge.kernels.rms_norm import FWD_LAUNCH_ENV, _forward_launch, reference_rms_norm, rms_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# (leading shape, hidden): single row, odd row counts, batch dims, hidden not a power of two, and
# whole tiles (hidden a power of two, rows a multiple of the rows per program: the unmasked path).
SHAPES = [((1,), 64), ((17,), 97), ((33,), 576), ((2, 17), 1000), ((64,), 128), ((2,), 4096)]


def make_inputs(lead, hidden, dtype, offset):
    x = torch.randn(*lead, hidden, device=DEVICE, dtype=dtype, requires_grad=True)
    # Gemma stores weight - 1 (small around 0); Llama's weight is around 1.
    w = (torch.randn(hidden, device=DEVICE) * 0.1 + (0.0 if offset else 1.0)).to(dtype).requires_grad_()
    return x, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("lead,hidden", SHAPES)
def test_forward_and_backward_match_reference(lead, hidden, offset, dtype):
    x, w = make_inputs(lead, hidden, dtype, offset)
    y = rms_norm(x, w, 1e-6, offset)
    ref = reference_rms_norm(x, w, 1e-6, offset)
    assert y.shape == x.shape and y.dtype == dtype
    assert rel_err(y, ref) < TOL[dtype]
    assert_gradients_match(y, ref, (x, w), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("module_cls,offset", [(LlamaRMSNorm, 0.0), (GemmaRMSNorm, 1.0)])
def test_reference_equals_transformers_bit_for_bit(module_cls, offset, dtype):
    hidden = 97
    module = module_cls(hidden, eps=1e-6).to(DEVICE, dtype)
    with torch.no_grad():
        module.weight.copy_(torch.randn(hidden) * 0.1 + (0.0 if offset else 1.0))
    x = torch.randn(17, hidden, device=DEVICE, dtype=dtype)
    assert torch.equal(reference_rms_norm(x, module.weight, 1e-6, offset), module(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("module_cls,offset", [(LlamaRMSNorm, 0.0), (GemmaRMSNorm, 1.0)])
def test_kernel_matches_transformers_module(module_cls, offset, dtype):
    hidden = 576
    module = module_cls(hidden, eps=1e-5).to(DEVICE, dtype)
    with torch.no_grad():
        module.weight.copy_(torch.randn(hidden) * 0.1 + (0.0 if offset else 1.0))
    x = torch.randn(2, 17, hidden, device=DEVICE, dtype=dtype, requires_grad=True)
    y_ref = module(x)
    y = rms_norm(x, module.weight, 1e-5, offset)
    assert rel_err(y, y_ref) < TOL[dtype]
    assert_gradients_match(y, y_ref, (x, module.weight), TOL[dtype])


@pytest.mark.parametrize("cast_before_weight", [True, False])
def test_cast_before_weight_picks_the_rounding_rule(cast_before_weight):
    # bf16 makes the two rules visibly different; the kernel must follow the one asked for.
    x, w = make_inputs((33,), 97, torch.bfloat16, 0.0)
    y = rms_norm(x, w, 1e-6, 0.0, cast_before_weight)
    ref = reference_rms_norm(x, w, 1e-6, 0.0, cast_before_weight)
    other = reference_rms_norm(x, w, 1e-6, 0.0, not cast_before_weight)
    assert not torch.equal(ref, other)
    assert rel_err(y, ref) < TOL[torch.bfloat16]


def test_frozen_weight_gets_no_gradient_and_dx_is_unchanged():
    # The LoRA case: norm weights are frozen, so the kernel skips dW.
    x, w = make_inputs((17,), 97, torch.float32, 0.0)
    w.requires_grad_(False)
    y = rms_norm(x, w)
    assert_gradients_match(y, reference_rms_norm(x, w), (x,), TOL[torch.float32])


def test_row_strided_input_is_read_in_place():
    # A slice of a wider buffer: rows are strided, the last dim is contiguous.
    base = torch.randn(17, 128, device=DEVICE)
    x = base[:, 5:102].requires_grad_()
    w = torch.randn(97, device=DEVICE, requires_grad=True)
    y = rms_norm(x, w)
    assert rel_err(y, reference_rms_norm(x, w)) < TOL[torch.float32]


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(4, 64, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight must have shape \(64,\)"):
        rms_norm(x, torch.ones(63, device=DEVICE))
    with pytest.raises(TypeError, match="x must be float32"):
        rms_norm(x.to(torch.int32), torch.ones(64, device=DEVICE))


@pytest.mark.parametrize("setting", ["1,4", "2,8", "4,2", "8,16"])
@pytest.mark.parametrize("lead,hidden", [((17,), 1000), ((16,), 256)])
def test_forward_launch_override_changes_nothing_but_speed(lead, hidden, setting, monkeypatch):
    # bench/kernels.py sweeps rows per program and warps through the environment; every setting,
    # with masked (17 rows, hidden 1000) and whole (16 x 256) tiles, must give the same result.
    monkeypatch.setenv(FWD_LAUNCH_ENV, setting)
    use_switches(monkeypatch)  # the environment is read once, by tuneforge.switches
    rows, warps = (int(v) for v in setting.split(","))
    assert _forward_launch(hidden, hidden) == (1024 if hidden == 1000 else 256, rows, warps)
    for offset in (0.0, 1.0):
        x, w = make_inputs(lead, hidden, torch.bfloat16, offset)
        y = rms_norm(x, w, 1e-6, offset)
        ref = reference_rms_norm(x, w, 1e-6, offset)
        assert rel_err(y, ref) < TOL[torch.bfloat16]
        assert_gradients_match(y, ref, (x, w), TOL[torch.bfloat16])


def test_forward_launch_keeps_tile_offsets_in_32_bits(monkeypatch):
    # Rows per program shrink when ROWS x row stride would overflow the kernel's int32 offsets.
    monkeypatch.setenv(FWD_LAUNCH_ENV, "8,4")
    use_switches(monkeypatch)
    assert _forward_launch(64, 2**29)[1] == 2
    assert _forward_launch(64, 2**31)[1] == 1


@pytest.mark.parametrize("setting", ["2", "3,8", "2,3", "two,eight"])
def test_bad_forward_launch_override_is_refused(setting, monkeypatch):
    monkeypatch.setenv(FWD_LAUNCH_ENV, setting)
    with pytest.raises(ValueError, match=FWD_LAUNCH_ENV):  # by switches, when it resolves them
        use_switches(monkeypatch)
        rms_norm(torch.randn(4, 64, device=DEVICE), torch.ones(64, device=DEVICE))
