"""Checks shared by the kernel tests (imported by name: pytest puts this folder on sys.path).

Errors are relative in norm, ||out - ref|| / ||ref||: one number per tensor that means the same
at every size, which each test file compares with the tolerance its docstring justifies.
"""

from __future__ import annotations

import dataclasses

import torch

from tuneforge import switches


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def assert_gradients_match(out, ref, inputs, tol: float) -> tuple[torch.Tensor, ...]:
    """Backpropagate one random upstream gradient through `out` (ours) and `ref` (the reference).

    Every gradient w.r.t. `inputs` must be finite, of its input's dtype, and within `tol` of the
    reference's; returns ours. Both graphs are freed.
    """
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, dy)
    grads_ref = torch.autograd.grad(ref, inputs, dy)
    for t, g, g_ref in zip(inputs, grads, grads_ref):
        assert g.dtype == t.dtype and torch.isfinite(g).all()
        assert rel_err(g, g_ref) < tol
    return grads


def check_gated_against_reference(kernel, reference, gate, up, tol: float) -> None:
    """A gated activation `kernel(gate, up)` equals `reference(gate, up)` forward and backward."""
    y, ref = kernel(gate, up), reference(gate, up)
    assert y.shape == gate.shape and y.dtype == gate.dtype
    assert rel_err(y, ref) < tol
    assert_gradients_match(y, ref, (gate, up), tol)


def check_mlp_with_kernel(mlp, gated, dtype, tol: float) -> None:
    """transformers' gated `mlp` vs its projections around our `gated(gate, up)` kernel.

    x: [2, 17, hidden]; gradients w.r.t. x and the gate / up weights (the ones the kernel's
    backward feeds).
    """
    x = torch.randn(2, 17, mlp.config.hidden_size, device=mlp.gate_proj.weight.device, dtype=dtype,
                    requires_grad=True)
    y_hf = mlp(x)
    y = mlp.down_proj(gated(mlp.gate_proj(x), mlp.up_proj(x)))
    assert rel_err(y, y_hf) < tol
    assert_gradients_match(y, y_hf, (x, mlp.gate_proj.weight, mlp.up_proj.weight), tol)


def use_switches(monkeypatch, **fields) -> switches.Switches:
    """For this test only, `tuneforge.switches.current()` returns switches read from the (monkeypatched)
    environment, with `fields` changed; bad environment values raise `SwitchError` here."""
    chosen = dataclasses.replace(switches.from_environment(), **fields)
    monkeypatch.setattr(switches, "_current", [chosen])
    return chosen
