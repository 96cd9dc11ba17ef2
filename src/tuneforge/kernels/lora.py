"""Fused LoRA projections (O, QKV, gated MLP) with a hand-written backward: dX, dA, dB only.

One LoRA projection, in peft's layout (lora_A.weight A: [r, in], lora_B.weight B: [out, r]):

    y = X @ W^T + bias + s * (X @ A^T) @ B^T          s = alpha / r  (alpha / sqrt(r) for rsLoRA)

The base W ([out, in], dense or bitsandbytes 4-bit) is frozen, so its gradient is never formed.
What the backward needs is X and the small XA = X @ A^T ([tokens, r]); a 4-bit W is dequantised
again in the backward instead of keeping the dense copy alive between the passes:

    dB = s * dY^T @ XA            dA = s * (dY @ B)^T @ X            dX = dY @ W + s * (dY @ B) @ A

Q, K and V read the same X: `LoRAQKVFunction` saves it once and sums the three dX. The gated MLP
`down(act(gate(X)) * up(X))` saves X, the gate and up outputs and the three small products; the
activation is recomputed in the backward by one Triton kernel that writes act(g)*u, d gate and
d up in place over the buffers it reads, so the backward holds three [tokens, intermediate]
tensors, not six.

The LoRA branch runs in X's dtype (A and B are cast to it; their gradients come back in their own
dtype); under torch.autocast X is first cast to the autocast dtype. peft instead casts X to the adapter's dtype (fp32 adapters under a bf16 model): results
agree to bf16 rounding.

Q/K/V and gate/up of NF4 bases run as one group (`kernels.lora_group`) when the caller asks
(`grouped`). The peft side (layers -> `LoRAProjection`, the grouping switch, decode steps without
autograd) is `tuneforge.lora.projections`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tuneforge.kernels._utils import (
    call_in_autocast_dtype,
    elementwise_launch,
    needs_bf16_rounding,
    round_bf16_rtne,
)
from tuneforge.kernels.geglu import _gelu_and_grad, geglu
from tuneforge.kernels.launcher import launch
from tuneforge.kernels.nf4 import dense_weight, reference_dequantize_nf4
from tuneforge.kernels import lora_group
from tuneforge.kernels.lora_group import Projection, ProjectionGroup, group_backward, group_forward, groupable
from tuneforge.kernels.rank_update import rank_update_
from tuneforge.kernels.swiglu import _silu_and_grad, swiglu
from tuneforge.kernels.weight_cache import cast_for_compute

logger = logging.getLogger(__name__)

__all__ = [
    "ACTIVATIONS",
    "LoRALinearFunction",
    "LoRAMLPFunction",
    "LoRAProjection",
    "LoRAQKVFunction",
    "check_activation",
    "check_inputs",
    "gated",
    "lora_linear",
    "lora_mlp",
    "lora_qkv",
    "projection_forward",
    "reference_lora_linear",
    "reference_lora_mlp",
    "reference_lora_qkv",
]

# Gate activations by the family table's names (FamilySpec.activation).
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
_ACT_CODE = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


@dataclass
class LoRAProjection:
    """One frozen base projection and its (optional) adapter, as tensors
    (`tuneforge.lora.projections.projection_of` reads one from a peft layer).

    weight:      [out, in] dense, or bitsandbytes packed 4-bit data (then quant_state is its QuantState).
    bias:        [out] or None (frozen unless it requires grad; then its grad is returned too).
    lora_A:      [r, in] or None (no adapter: the base projection only).
    lora_B:      [out, r] or None.
    scaling:     s in y = ... + s * (X A^T) B^T.
    """

    weight: torch.Tensor
    quant_state: object = None
    bias: torch.Tensor | None = None
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None
    scaling: float = 1.0

    def as_args(self) -> tuple:
        """(weight, quant_state, bias, lora_A, lora_B, scaling): how a projection travels through
        Function.apply, which takes tensors, not objects."""
        return (self.weight, self.quant_state, self.bias, self.lora_A, self.lora_B, self.scaling)


_N_ARGS = 6  # LoRAProjection.as_args() length: how projections travel through Function.apply


def projection_forward(x, weight, quant_state, bias, lora_A, lora_B, scaling):
    """y [..., out] and XA [T, r] (None without adapter) for x [..., in], no autograd; the dense W is
    dropped at once. Arguments: `LoRAProjection.as_args()`.

    y is a fresh tensor, never a view (matmul folds the leading dims and un-views its result), so
    an attention layer may rotate q and k in place: autograd forbids in-place writes to a view
    made inside a custom Function.
    """
    w = dense_weight(weight, quant_state, x.dtype)
    if bias is None:
        y = torch.matmul(x, w.t())
    elif x.dim() == 2:
        y = torch.addmm(bias.to(x.dtype), x, w.t())
    else:
        y = torch.matmul(x, w.t()).add_(bias.to(x.dtype))
    del w
    if lora_A is None:
        return y, None
    xa = x.reshape(-1, x.shape[-1]) @ cast_for_compute(lora_A, x.dtype).t()
    rank_update_(y.view(-1, y.shape[-1]), xa, cast_for_compute(lora_B, x.dtype), scaling)
    return y, xa


def _scaled(product: torch.Tensor, scaling: float) -> torch.Tensor:
    """product * scaling in place (a fresh GEMM output); no launch for the common scaling 1."""
    return product if float(scaling) == 1.0 else product.mul_(scaling)


def _projection_backward(dy, x, xa, weight, quant_state, bias, lora_A, lora_B, scaling, need_dx, dx=None):
    """(dx, dbias, dA, dB) for one projection; dx accumulates into `dx` when given."""
    dA = dB = dbias = None
    if need_dx:
        w = dense_weight(weight, quant_state, dy.dtype)
        dx = dy @ w if dx is None else dx.addmm_(dy, w)
        del w
    if bias is not None and bias.requires_grad:
        dbias = dy.sum(0).to(bias.dtype)
    if lora_A is not None:
        dB = _scaled(dy.t() @ xa, scaling).to(lora_B.dtype)
        dyb = dy @ cast_for_compute(lora_B, dy.dtype)  # [T, r]
        dA = _scaled(dyb.t() @ x, scaling).to(lora_A.dtype)
        if need_dx:
            rank_update_(dx, dyb, cast_for_compute(lora_A, dy.dtype).t(), scaling)
    return dx, dbias, dA, dB


# Grouped projections (kernels.lora_group) run when the caller asks (`grouped`). Their Triton kernels
# are built at the first use of each configuration; one that fails to build on this GPU turns
# grouping off for the process, with a warning, and each projection then runs on its own. This is
# a cache of what built here, not a switch: "built" holds the configurations that did.
_builds = {"failed": False, "built": set()}


def _triton_build_errors() -> tuple[type[BaseException], ...]:
    import triton.compiler.errors
    import triton.runtime.errors

    found = [getattr(module, name, None) for module, name in (
        (triton.compiler.errors, "CompilationError"), (triton.runtime.errors, "OutOfResources"),
        (triton.runtime.errors, "PTXASError"))]
    return tuple(error for error in found if error is not None)


def _checks_builds(x: torch.Tensor) -> bool:
    """Kernels are built (and can fail to) on a GPU; the CPU interpreter runs anything."""
    return x.device.type == "cuda"


def _build_group_kernels(group: ProjectionGroup, x: torch.Tensor, activation: str | None) -> None:
    lora_group.warm_up(group, x.dtype, x.device)
    if activation is not None:  # the gated kernels over [g | u] halves, at the real width
        gu = torch.zeros(2, group.out_features, dtype=x.dtype, device=x.device)
        h = _gated_halves(gu, activation)
        _gated_backward_inplace(h, gu[:, : h.shape[1]], gu[:, h.shape[1]:], activation)


def _group_of(parts: list[tuple], x: torch.Tensor, grouped: bool, activation: str | None = None) -> ProjectionGroup | None:
    """The ProjectionGroup of `parts` for input `x`, or None: not asked for (`grouped` False), not
    groupable, or its kernels failed to build here (logged once)."""
    if not grouped or _builds["failed"] or not groupable(parts):
        return None
    group = ProjectionGroup(parts)
    key = (x.device, x.dtype, activation, tuple(group.sizes), group.in_features, tuple(group.ranks))
    if key in _builds["built"] or not _checks_builds(x):
        return group
    try:
        _build_group_kernels(group, x, activation)
    except _triton_build_errors() as error:
        _builds["failed"] = True
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        logger.warning("grouped LoRA projections off: a Triton kernel did not build on %s (%s: %s); each "
                       "projection runs on its own", x.device, type(error).__name__, first_line[:200])
        return None
    _builds["built"].add(key)
    return group


def _split_args(projections) -> list[Projection]:
    """Concatenated `LoRAProjection.as_args()` tuples -> one Projection per projection."""
    return [Projection(*projections[i : i + _N_ARGS]) for i in range(0, len(projections), _N_ARGS)]


def check_inputs(x: torch.Tensor, projections: tuple) -> None:
    """Raise when x [..., in] does not fit a projection of `projections` (concatenated
    `LoRAProjection.as_args()`), or one has lora_A without lora_B."""
    for i in range(0, len(projections), _N_ARGS):
        weight, quant_state, _, lora_A, lora_B, _ = projections[i : i + _N_ARGS]
        in_features = quant_state.shape[1] if quant_state is not None else weight.shape[1]
        if x.shape[-1] != in_features:
            raise ValueError(f"x has {x.shape[-1]} features but the projection takes {in_features}")
        if (lora_A is None) != (lora_B is None):
            raise ValueError("lora_A and lora_B must be given together")


class LoRAQKVFunction(torch.autograd.Function):
    """Several LoRA projections of one input (Q, K, V): X saved once, dX summed.

    apply(X [..., in], grouped, *projections) -> tuple of Y_i [..., out_i]; `projections` is the
    concatenation of `LoRAProjection.as_args()` of each projection; `grouped`: NF4 bases may run
    as one group (`kernels.lora_group`).
    """

    @staticmethod
    def forward(ctx, x, grouped, *projections):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        ctx.projections = projections
        ctx.x_shape = shape
        parts = _split_args(projections)
        ctx.group = _group_of(parts, x2, grouped)
        if ctx.group is not None:
            # One GEMM for all: the outputs are column blocks (views) of one [..., N] tensor, so
            # attention rotates q and k out of place (patch.attention._rotate).
            y, xa = group_forward(x2, ctx.group)
            ctx.save_for_backward(x2, xa)
            y = y.view(*shape[:-1], y.shape[-1])
            return tuple(y[..., ctx.group.rows(j)] for j in range(len(parts)))
        outs, saved = [], [x2]
        for args in parts:
            y, xa = projection_forward(x, *args)  # y [..., out], not a view
            outs.append(y)
            saved.append(xa)
        ctx.save_for_backward(*saved)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        x2, *xas = ctx.saved_tensors
        projections = ctx.projections
        need_dx = ctx.needs_input_grad[0]
        if ctx.group is not None:
            dy = torch.cat([d.reshape(-1, d.shape[-1]) for d in dys], dim=1)
            dx, group_grads = group_backward(dy, x2, xas[0], ctx.group, need_dx)
            grads = [g for dbias, dA, dB in group_grads for g in (None, None, dbias, dA, dB, None)]
            return (dx.view(ctx.x_shape) if need_dx else None, None, *grads)
        dx, grads = None, []
        for k, dy in enumerate(dys):
            args = projections[k * _N_ARGS : (k + 1) * _N_ARGS]
            weight, quant_state, bias, lora_A, lora_B, scaling = args
            dy2 = dy.reshape(-1, dy.shape[-1])
            dx, dbias, dA, dB = _projection_backward(
                dy2, x2, xas[k], weight, quant_state, bias, lora_A, lora_B, scaling, need_dx, dx
            )
            grads += [None, None, dbias, dA, dB, None]
        return (dx.view(ctx.x_shape) if need_dx else None, None, *grads)


class LoRALinearFunction(torch.autograd.Function):
    """One LoRA projection: apply(X [..., in], *LoRAProjection.as_args()) -> Y [..., out]."""

    @staticmethod
    def forward(ctx, x, *projection):
        (y,) = LoRAQKVFunction.forward(ctx, x, False, *projection)  # one projection: nothing to group
        return y

    @staticmethod
    def backward(ctx, dy):
        dx, _, *grads = LoRAQKVFunction.backward(ctx, dy)
        return (dx, *grads)


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr):
    """act(g) and act'(g) in fp32; ACT 0 silu, 1 gelu (erf), 2 gelu (tanh): the swiglu / geglu maths."""
    if ACT == 0:
        act, dact = _silu_and_grad(g)
    else:
        act, dact = _gelu_and_grad(g, ACT == 2)
    return act, dact


@triton.jit
def _gated_backward_inplace_kernel(
    DH,  # [n] in: d loss / d h;  out: h = act(g) * u (the down projection's input, recomputed)
    GATE,  # [n] in: g;  out: d loss / d g
    UP,  # [n] in: u;  out: d loss / d u
    n,
    ACT: tl.constexpr,  # 0 silu, 1 gelu (erf), 2 gelu (tanh)
    ROUND_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Every element is read before its slots are overwritten, and no other element reads them:
    # in-place is safe and saves three [tokens, intermediate] buffers.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    act, dact = _act_and_grad(g, ACT)
    ty = DH.dtype.element_ty
    tl.store(DH + offs, round_bf16_rtne(act * u, ROUND_BF16).to(ty), mask=mask)
    tl.store(GATE + offs, round_bf16_rtne(dh * u * dact, ROUND_BF16).to(ty), mask=mask)
    tl.store(UP + offs, round_bf16_rtne(dh * act, ROUND_BF16).to(ty), mask=mask)


@triton.jit
def _gated_pairs_kernel(
    GATE,  # [T, cols] via stride_gu: g
    UP,  # [T, cols] via stride_gu: u
    H,  # [T, cols] contiguous out: act(g) * u
    cols, stride_gu,
    ACT: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per (row, column block): g and u may be the two halves of one [T, 2 * cols]
    # GEMM output (stride_gu = 2 * cols), read in place.
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = col < cols
    g = tl.load(GATE + row * stride_gu + col, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + row * stride_gu + col, mask=mask, other=0.0).to(tl.float32)
    act, _ = _act_and_grad(g, ACT)
    tl.store(H + row * cols + col, round_bf16_rtne(act * u, ROUND_BF16).to(H.dtype.element_ty), mask=mask)


@triton.jit
def _gated_backward_rows_kernel(
    DH,  # [T, cols] contiguous; in: d loss / d h;  out: h = act(g) * u (the down projection's input, recomputed)
    GATE,  # [T, cols] via stride_gu; in: g;  out: d loss / d g
    UP,  # [T, cols] via stride_gu; in: u;  out: d loss / d u
    cols, stride_gu,
    ACT: tl.constexpr,  # 0 silu, 1 gelu (erf), 2 gelu (tanh)
    ROUND_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # `_gated_backward_inplace_kernel` by rows, for g and u the halves of one [T, 2 * cols]
    # buffer: that buffer becomes d[gate | up], the grouped backward's dY.
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = col < cols
    dh = tl.load(DH + row * cols + col, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + row * stride_gu + col, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + row * stride_gu + col, mask=mask, other=0.0).to(tl.float32)
    act, dact = _act_and_grad(g, ACT)
    ty = DH.dtype.element_ty
    tl.store(DH + row * cols + col, round_bf16_rtne(act * u, ROUND_BF16).to(ty), mask=mask)
    tl.store(GATE + row * stride_gu + col, round_bf16_rtne(dh * u * dact, ROUND_BF16).to(ty), mask=mask)
    tl.store(UP + row * stride_gu + col, round_bf16_rtne(dh * act, ROUND_BF16).to(ty), mask=mask)


def _row_launch(rows: int, cols: int) -> tuple[tuple[int, int], int, int]:
    """(grid, BLOCK, num_warps) for the row-wise gated kernels over [rows, cols]."""
    block = min(2048, max(128, triton.next_power_of_2(cols)))
    return (rows, triton.cdiv(cols, block)), block, 8 if block >= 2048 else 4


def _gated_halves(gu: torch.Tensor, activation: str) -> torch.Tensor:
    """act(g) * u for gu = [g | u] ([T, 2 * I], the grouped gate|up GEMM output) -> [T, I]."""
    rows, cols = gu.shape[0], gu.shape[1] // 2
    h = torch.empty(rows, cols, dtype=gu.dtype, device=gu.device)
    if rows and cols:
        grid, block, num_warps = _row_launch(rows, cols)
        launch(_gated_pairs_kernel, grid, gu, gu[:, cols:], h, cols, gu.stride(0), ACT=_ACT_CODE[activation],
               ROUND_BF16=needs_bf16_rounding(h.dtype), BLOCK=block, num_warps=num_warps)
    return h


def _gated_backward_inplace(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, activation: str) -> None:
    """dh <- act(g) * u, g <- d gate, u <- d up, in place; dh [T, I] contiguous; g and u [T, I]
    contiguous (flat kernel), or the halves of one [T, 2 * I] buffer (row kernel)."""
    rows, cols = dh.shape
    if not (rows and cols):
        return
    extra = dict(ACT=_ACT_CODE[activation], ROUND_BF16=needs_bf16_rounding(dh.dtype))
    if g.is_contiguous() and u.is_contiguous():
        block, num_warps = elementwise_launch(dh.numel())
        launch(_gated_backward_inplace_kernel, (triton.cdiv(dh.numel(), block),),
            dh, g, u, dh.numel(), BLOCK=block, num_warps=num_warps, **extra)
        return
    grid, block, num_warps = _row_launch(rows, cols)
    launch(_gated_backward_rows_kernel, grid, dh, g, u, cols, g.stride(0), BLOCK=block, num_warps=num_warps, **extra)


def gated(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up by the swiglu / geglu kernels; gate, up: [...] -> [...]; activation one of ACTIVATIONS."""
    if activation == "silu":
        return swiglu(gate, up)
    return geglu(gate, up, approximate="tanh" if activation == "gelu_tanh" else "none")


def check_activation(activation: str) -> None:
    """Raise unless `activation` is one of ACTIVATIONS."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS} (the family table's names), got {activation!r}")


class LoRAMLPFunction(torch.autograd.Function):
    """down(act(gate(X)) * up(X)) with LoRA on all three projections.

    apply(X [..., H], activation, grouped, *gate.as_args(), *up.as_args(), *down.as_args()) -> Y [..., H_out].
    Saves X, g and u ([T, I] each) and the three [T, r] LoRA products; act(g) * u is recomputed.
    grouped: NF4 gate and up may run as one group (one GEMM gives [g | u]).
    """

    @staticmethod
    def forward(ctx, x, activation, grouped, *projections):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        gate, up, down = _split_args(projections)
        ctx.group = _group_of([gate, up], x2, grouped, activation)
        if ctx.group is not None:  # one GEMM gives [g | u]; the activation reads both halves in place
            gu, xa_gu = group_forward(x2, ctx.group)
            h = _gated_halves(gu, activation)
            y, ha_d = projection_forward(h, *down)
            del h
            ctx.save_for_backward(x2, gu, xa_gu, ha_d)
        else:
            g, xa_g = projection_forward(x2, *gate)
            u, xa_u = projection_forward(x2, *up)
            h = gated(g, u, activation)
            y, ha_d = projection_forward(h, *down)
            del h
            ctx.save_for_backward(x2, g, u, xa_g, xa_u, ha_d)
        ctx.projections = (gate, up, down)
        ctx.activation = activation
        ctx.x_shape = shape
        ctx.backward_done = False
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        if ctx.backward_done:
            raise RuntimeError("LoRAMLPFunction overwrites its saved tensors in backward: back-propagate it once only")
        ctx.backward_done = True
        if ctx.group is not None:
            x2, gu, xa_gu, ha_d = ctx.saved_tensors
            cols = gu.shape[1] // 2
            g, u = gu[:, :cols], gu[:, cols:]
        else:
            x2, g, u, xa_g, xa_u, ha_d = ctx.saved_tensors
        gate, up, down = ctx.projections
        dy2 = dy.reshape(-1, dy.shape[-1])
        w_d, qs_d, b_d, a_d, bb_d, s_d = down

        # dh = dY @ W_down + s * (dY @ B_down) @ A_down; the LoRA grads of down need h, made below.
        dh = dy2 @ dense_weight(w_d, qs_d, dy2.dtype)
        dyb_d = None
        if a_d is not None:
            dyb_d = dy2 @ cast_for_compute(bb_d, dy2.dtype)
            rank_update_(dh, dyb_d, cast_for_compute(a_d, dy2.dtype).t(), s_d)
        _gated_backward_inplace(dh, g, u, ctx.activation)
        h, dg, du = dh, g, u  # renamed: the kernel rewrote the buffers
        grads_down = [None, None, None, None, None, None]
        if b_d is not None and b_d.requires_grad:
            grads_down[2] = dy2.sum(0).to(b_d.dtype)
        if a_d is not None:
            grads_down[4] = _scaled(dy2.t() @ ha_d, s_d).to(bb_d.dtype)
            grads_down[3] = _scaled(dyb_d.t() @ h, s_d).to(a_d.dtype)
        del h, dh

        need_dx = ctx.needs_input_grad[0]
        if ctx.group is not None:  # the kernel turned [g | u] into d[gate | up]
            del dg, du
            dx, ((dbias_g, dA_g, dB_g), (dbias_u, dA_u, dB_u)) = group_backward(gu, x2, xa_gu, ctx.group, need_dx)
        else:
            dx, dbias_g, dA_g, dB_g = _projection_backward(dg, x2, xa_g, *gate, need_dx)
            dx, dbias_u, dA_u, dB_u = _projection_backward(du, x2, xa_u, *up, need_dx, dx)
        return (
            dx.view(ctx.x_shape) if need_dx else None, None, None,
            None, None, dbias_g, dA_g, dB_g, None,
            None, None, dbias_u, dA_u, dB_u, None,
            *grads_down,
        )


def lora_linear(x: torch.Tensor, projection: LoRAProjection) -> torch.Tensor:
    """y = x W^T + bias + s (x A^T) B^T through `LoRALinearFunction`; for O projections.

    x: [..., in]; returns [..., out] in x's dtype (under torch.autocast: its dtype).
    """
    args = projection.as_args()
    check_inputs(x, args)
    return call_in_autocast_dtype(LoRALinearFunction.apply, x, *args)


def lora_qkv(x: torch.Tensor, projections: Sequence[LoRAProjection], grouped: bool) -> tuple[torch.Tensor, ...]:
    """(y_1, ..., y_m) of projections of one x in one autograd node that saves x once.

    x: [..., hidden]; projections: Q, K, V (one without adapter is allowed, e.g. peft's default
    targets q_proj and v_proj only). Returns [..., out_j] each. grouped: NF4 bases as one GEMM; the
    outputs are then column blocks (views) of one tensor.
    """
    args = sum((p.as_args() for p in projections), ())
    check_inputs(x, args)
    return call_in_autocast_dtype(LoRAQKVFunction.apply, x, grouped, *args)


def lora_mlp(x: torch.Tensor, gate: LoRAProjection, up: LoRAProjection, down: LoRAProjection, activation: str,
             grouped: bool) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) through `LoRAMLPFunction`.

    x: [..., hidden]; activation: "silu" (SwiGLU: Llama, Mistral, Qwen), "gelu_tanh" (Gemma's
    gelu_pytorch_tanh) or "gelu" (exact erf); grouped: NF4 gate and up as one GEMM. Returns [..., hidden].
    """
    check_activation(activation)
    check_inputs(x, gate.as_args() + up.as_args())
    args = (*gate.as_args(), *up.as_args(), *down.as_args())
    return call_in_autocast_dtype(LoRAMLPFunction.apply, x, activation, grouped, *args)


def reference_lora_linear(x: torch.Tensor, projection: LoRAProjection) -> torch.Tensor:
    """Plain PyTorch (autograd) y = x W^T + bias + s (x A^T) B^T, in x's dtype; x: [..., in] -> [..., out]."""
    p = projection
    if p.quant_state is not None:
        w = reference_dequantize_nf4(p.weight, p.quant_state, x.dtype)
    else:
        w = p.weight.to(x.dtype)
    y = torch.nn.functional.linear(x, w, None if p.bias is None else p.bias.to(x.dtype))
    if p.lora_A is not None:
        y = y + p.scaling * ((x @ p.lora_A.to(x.dtype).t()) @ p.lora_B.to(x.dtype).t())
    return y


def reference_lora_qkv(x: torch.Tensor, projections: Sequence[LoRAProjection]) -> tuple[torch.Tensor, ...]:
    """Plain PyTorch (autograd) `reference_lora_linear` of each projection; x: [..., in] -> ([..., out_j], ...)."""
    return tuple(reference_lora_linear(x, p) for p in projections)


def reference_lora_mlp(x, gate: LoRAProjection, up: LoRAProjection, down: LoRAProjection, activation="silu"):
    """Plain PyTorch (autograd) down(act(gate(x)) * up(x)); x: [..., H] -> [..., H_out]."""
    check_activation(activation)
    g, u = reference_lora_linear(x, gate), reference_lora_linear(x, up)
    if activation == "silu":
        a = torch.nn.functional.silu(g)
    else:
        a = torch.nn.functional.gelu(g, approximate="tanh" if activation == "gelu_tanh" else "none")
    return reference_lora_linear(a * u, down)
