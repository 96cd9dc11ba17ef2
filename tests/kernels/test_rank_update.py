"""The rank-r update kernel (y += s * XA @ Bt^T, one pass over y) against torch's addmm.

Tolerances: fp32 accumulation in both; the only difference is where y's single rounding to the
output dtype happens, so bf16/fp16 agree to within one ulp of y (rel. 2**-7 / 2**-10), fp32 to 1e-5.
"""

import pytest
import torch

from tuneforge.kernels.rank_update import launch_rank_update_, rank_update_, reference_rank_update

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, cols, r", [(1, 97, 8), (17, 176, 16), (70, 300, 32)])
@pytest.mark.parametrize("transposed", [False, True], ids=["B", "A.t()"])
def test_rank_update_matches_addmm(dtype, rows, cols, r, transposed):
    if dtype == torch.float32 and DEVICE == "cuda":
        pytest.skip("fp32 dots round through tf32 on the GPU; rank_update_ uses addmm_ for fp32 there")
    y = torch.randn(rows, cols, device=DEVICE).to(dtype)
    xa = torch.randn(rows, r, device=DEVICE).to(dtype)
    # The forward passes lora_B [out, r]; dX passes lora_A [r, in] transposed (strided).
    b_t = torch.randn(r, cols, device=DEVICE).to(dtype).t() if transposed else torch.randn(cols, r, device=DEVICE).to(dtype)
    expected = (y.float() + 0.5 * (xa.float() @ b_t.float().t())).to(dtype)
    got = launch_rank_update_(y.clone(), xa, b_t, 0.5)
    error = (got.float() - expected.float()).norm() / expected.float().norm()
    assert error < TOLERANCE[dtype], error


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rank_update_of_column_slices_in_place(dtype):
    """A grouped projection updates the columns of one projection in a [T, N] buffer from the
    columns of its adapter in a [T, R] product (row-strided views, written in place); a rank of
    48 (three r=16 adapters side by side) fills a 64-wide tile."""
    y = torch.randn(33, 200, device=DEVICE).to(dtype)
    xa = torch.randn(33, 80, device=DEVICE).to(dtype)
    b_t = torch.randn(120, 48, device=DEVICE).to(dtype)
    expected = y.float().clone()
    expected[:, 40:160] += 0.5 * (xa[:, 16:64].float() @ b_t.float().t())
    got = y.clone()
    out = launch_rank_update_(got[:, 40:160], xa[:, 16:64], b_t, 0.5)
    assert out.data_ptr() == got[:, 40:160].data_ptr()
    assert torch.equal(got[:, :40], y[:, :40]) and torch.equal(got[:, 160:], y[:, 160:])
    error = (got.float() - expected).norm() / expected.norm()
    assert error < TOLERANCE[dtype], error


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r", [16, 80], ids=["one-tile", "above-MAX_RANK"])
def test_rank_update_dispatch_matches_the_reference(dtype, r):
    """rank_update_ (the kernel, or addmm_ where it does not apply) against reference_rank_update."""
    y = torch.randn(17, 176, device=DEVICE).to(dtype)
    xa = torch.randn(17, r, device=DEVICE).to(dtype)
    b_t = torch.randn(176, r, device=DEVICE).to(dtype)
    expected = reference_rank_update(y, xa, b_t, 0.5)
    got = rank_update_(y.clone(), xa, b_t, 0.5)
    error = (got.float() - expected.float()).norm() / expected.float().norm()
    assert error < TOLERANCE[dtype], error
