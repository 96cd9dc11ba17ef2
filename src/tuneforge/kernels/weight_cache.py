"""Compute-dtype copies of the (fp32) LoRA weights, cast once per optimizer step.

Under autocast every use of an fp32 LoRA weight by a bf16 matmul casts it again: forward,
checkpointed recompute and backward each cast A and B, four extra launches per projection per
step on a step that is bound by launches, not by the GPU. The weights only change when the
optimizer steps (or a user writes into them), so one cast per step gives the same values.

A copy is reused only while all of these hold:
  - no optimizer has stepped since it was made (a global post-step hook counts steps, for
    every torch.optim.Optimizer subclass, bitsandbytes' included);
  - the weight's version counter is unchanged (any in-place write: load_state_dict, copy_, ...);
  - it is the same storage and dtype.
Copies are made only outside autograd recording (inside our Functions' forward/backward), so a
cached tensor never carries a graph.

While a CUDA graph is being captured nothing is reused or kept: the graph must contain the cast,
because its replays run after optimizer steps that no Python check sees (train/graphed_step.py).
"""

from __future__ import annotations

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from tuneforge.device import is_capturing

_optimizer_steps = 0


def _count_step(optimizer, args, kwargs) -> None:  # noqa: ARG001 - the hook's signature
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_step)


def cast_for_compute(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight.to(dtype)`, reused from the last call while the weight cannot have changed."""
    if weight.dtype == dtype:
        return weight
    return derived_for_compute(weight, f"cast-{dtype}", (weight,), lambda: weight.detach().to(dtype))


def derived_for_compute(owner: torch.Tensor, tag: str, parts: tuple, build):
    """`build()` (a tensor made from `parts`, e.g. several adapters concatenated in the compute
    dtype), reused while none of `parts` can have changed, by the rules above; kept on `owner`.

    tag: names the derivation (and its dtype) among those kept on one owner.
    parts: tensors or None.
    """
    if is_capturing(owner.device):
        return build()
    key = (_optimizer_steps, tuple(None if p is None else (p._version, p.data_ptr(), p.dtype) for p in parts))
    store = getattr(owner, "_tuneforge_derived", None)
    if store is None:
        store = owner._tuneforge_derived = {}
    cached = store.get(tag)
    if cached is not None and cached[0] == key:
        return cached[1]
    value = build()
    store[tag] = (key, value)
    return value
