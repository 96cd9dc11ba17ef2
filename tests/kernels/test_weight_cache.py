"""cast_for_compute: one cast per optimizer step, never a stale copy."""

import pytest
import torch

from tuneforge.kernels.weight_cache import cast_for_compute


def test_reused_until_the_weight_can_change():
    weight = torch.nn.Parameter(torch.randn(4, 8))
    first = cast_for_compute(weight, torch.bfloat16)
    assert first.dtype == torch.bfloat16 and torch.equal(first, weight.detach().to(torch.bfloat16))
    assert cast_for_compute(weight, torch.bfloat16) is first
    assert cast_for_compute(weight, torch.float32) is weight  # already that dtype: no copy


@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.AdamW])
def test_an_optimizer_step_makes_a_new_copy(optimizer_class):
    weight = torch.nn.Parameter(torch.randn(4, 8))
    optimizer = optimizer_class([weight], lr=0.5)
    stale = cast_for_compute(weight, torch.bfloat16)
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    fresh = cast_for_compute(weight, torch.bfloat16)
    assert fresh is not stale
    assert torch.equal(fresh, weight.detach().to(torch.bfloat16))
    assert not torch.equal(fresh, stale)


def test_an_in_place_write_makes_a_new_copy():
    weight = torch.nn.Parameter(torch.zeros(4, 8))
    stale = cast_for_compute(weight, torch.bfloat16)
    with torch.no_grad():
        weight.copy_(torch.full((4, 8), 3.0))  # what load_state_dict does
    assert torch.equal(cast_for_compute(weight, torch.bfloat16), torch.full((4, 8), 3.0, dtype=torch.bfloat16))
    assert not torch.equal(stale, cast_for_compute(weight, torch.bfloat16))


def test_bitsandbytes_8bit_adamw_step_is_seen():
    """bitsandbytes writes through p.data (no version bump): the global step hook must catch it."""
    bnb = pytest.importorskip("bitsandbytes")
    weight = torch.nn.Parameter(torch.randn(64, 64))
    optimizer = bnb.optim.AdamW8bit([weight], lr=0.1, min_8bit_size=1)
    stale = cast_for_compute(weight, torch.bfloat16)
    weight.grad = torch.randn_like(weight)
    try:
        optimizer.step()
    except (RuntimeError, NotImplementedError) as error:  # no CPU kernel for this optimizer here
        pytest.skip(f"bitsandbytes 8-bit AdamW cannot step on this device: {error}")
    assert torch.equal(cast_for_compute(weight, torch.bfloat16), weight.detach().to(torch.bfloat16))
    assert not torch.equal(stale, cast_for_compute(weight, torch.bfloat16))
