"""Several NF4 LoRA projections of one input as one GEMM: Q|K|V, and gate|up of a gated MLP.

Projections j = 1..m read the same X [T, in]: NF4 base W_j [n_j, in], bias b_j, adapter
A_j [r_j, in] and B_j [n_j, r_j] with scale s_j (r_j = 0 for a projection without adapter):

    Y = [Y_1 | ... | Y_m] = X W^T + b + s (X A^T) Bd^T          [T, N],  N = sum n_j
    W  = [W_1; ...; W_m]        [N, in]   the m weights dequantised into one buffer
    A  = [A_1; ...; A_m]        [R, in]   R = sum r_j
    Bd = block-diagonal         [N, R]    block (rows of j, columns of A_j) = B_j,
                                          or s_j B_j with s = 1 when the scales differ

One GEMM, one X A^T and one rank-R update replace m of each: fewer launches on a training step
that is bound by launching them (H100 profile: the 1B shape's step issues ~4,000 kernels and the
CPU, not the GPU, sets its pace), and wider GEMMs for the small K/V projections. The backward,
with dY = [dY_1 | ... | dY_m]:

    D    = dY Bd                [T, R]    (column block j is dY_j B_j, times s_j when folded)
    dX   = dY W + s D A
    dA   = s D^T X              rows of A_j
    dB_j = s_j (dY^T XA)[rows of j, columns of A_j]

A and Bd are built in the compute dtype once per optimizer step (`weight_cache`). Only NF4 bases
are grouped (`groupable`): their dense copy is made per use anyway, so writing it into one buffer
costs nothing; dense 16-bit bases would need a concatenated copy, and keep the per-projection path
(a group of dense bases still computes, by that copy: the tests check the maths on exact weights).

`reference_group_forward` / `reference_group_backward` are the same maths in plain PyTorch, one
projection at a time.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from tuneforge.kernels.nf4 import dense_weight, dequantize_nf4_rows, reference_dequantize_nf4
from tuneforge.kernels.rank_update import MAX_RANK, rank_update_
from tuneforge.kernels.weight_cache import derived_for_compute

__all__ = [
    "Projection", "ProjectionGroup", "group_backward", "group_forward", "groupable", "reference_group_backward",
    "reference_group_forward", "warm_up",
]


class Projection(NamedTuple):
    """One projection of a group, in `LoRAProjection.as_args()` order (any such tuple converts:
    `Projection(*args)`).

    weight:      [n, in] dense, or bitsandbytes packed 4-bit data (then quant_state is its QuantState).
    bias:        [n] or None.
    lora_A:      [r, in] or None (no adapter).
    lora_B:      [n, r] or None.
    scaling:     s of the adapter.
    """

    weight: torch.Tensor
    quant_state: object
    bias: torch.Tensor | None
    lora_A: torch.Tensor | None
    lora_B: torch.Tensor | None
    scaling: float


def _out_features(p: Projection) -> int:
    return int(p.quant_state.shape[0]) if p.quant_state is not None else int(p.weight.shape[0])


def _in_features(p: Projection) -> int:
    return int(p.quant_state.shape[1]) if p.quant_state is not None else int(p.weight.shape[1])


def groupable(parts: list[tuple]) -> bool:
    """True when `parts` (Projections, or LoRAProjection.as_args() tuples) can run as one group: two
    or more projections, every base NF4 (a quant_state) with the same input size."""
    parts = [Projection(*p) for p in parts]
    if len(parts) < 2 or any(p.quant_state is None for p in parts):
        return False
    return len({_in_features(p) for p in parts}) == 1


class ProjectionGroup:
    """The concatenated view of m projections (see the module docstring); built per call, cheap:
    it only reads shapes, and its tensors come from the per-step cache."""

    def __init__(self, parts: list[tuple]) -> None:
        self.parts = parts = [Projection(*p) for p in parts]
        self.sizes = [_out_features(p) for p in parts]
        self.in_features = _in_features(parts[0])
        self.row_starts = [sum(self.sizes[:j]) for j in range(len(parts))]
        self.out_features = sum(self.sizes)
        self.ranks = [0 if p.lora_A is None else int(p.lora_A.shape[0]) for p in parts]
        self.col_starts = [sum(self.ranks[:j]) for j in range(len(parts))]
        self.rank = sum(self.ranks)
        scales = {float(p.scaling) for p, r in zip(parts, self.ranks) if r}
        # One scale for all: it goes to the kernels; several: each folds into its block of Bd.
        self.scale = scales.pop() if len(scales) == 1 else 1.0
        self.folded = len(scales) > 0

    def rows(self, j: int) -> slice:
        return slice(self.row_starts[j], self.row_starts[j] + self.sizes[j])

    def cols(self, j: int) -> slice:
        return slice(self.col_starts[j], self.col_starts[j] + self.ranks[j])

    def dense_weight(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """W [N, in] in `dtype`: the NF4 weights dequantised into their rows of one buffer (one launch);
        dense bases (never grouped by `groupable`) concatenated."""
        if any(p.quant_state is None for p in self.parts):
            return torch.cat([dense_weight(p.weight, p.quant_state, dtype) for p in self.parts]).to(device)
        w = torch.empty(self.out_features, self.in_features, dtype=dtype, device=device)
        return dequantize_nf4_rows([(p.weight, p.quant_state) for p in self.parts], w)

    def bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """b [N] in `dtype` (zeros where a projection has none), or None when none has one."""
        biases = [p.bias for p in self.parts]
        present = [b for b in biases if b is not None]
        if not present:
            return None

        def build():
            out = torch.zeros(self.out_features, dtype=dtype, device=present[0].device)
            for j, b in enumerate(biases):
                if b is not None:
                    out[self.rows(j)] = b.detach().to(dtype)
            return out

        return derived_for_compute(present[0], f"group-bias-{dtype}", tuple(biases), build)

    def adapters(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [R, in], Bd [N, R]) in `dtype`; call only when self.rank > 0."""
        parts = self.parts
        owner = next(p.lora_A for p in parts if p.lora_A is not None)
        tensors = tuple(t for p in parts for t in (p.lora_A, p.lora_B))

        # Built once per optimizer step, in as few launches as the ops allow (concatenate, then
        # cast): the step this is for is bound by launching kernels.
        def build_a():
            return torch.cat([p.lora_A.detach() for p in parts if p.lora_A is not None]).to(dtype)

        def build_bd():
            b_dtype = next(p.lora_B.dtype for p in parts if p.lora_B is not None)
            blocks = []
            for p in parts:
                if p.lora_A is None:  # rows without columns: this projection has no adapter
                    blocks.append(torch.zeros(_out_features(p), 0, dtype=b_dtype, device=owner.device))
                else:
                    blocks.append(p.lora_B.detach() * float(p.scaling) if self.folded else p.lora_B.detach())
            return torch.block_diag(*blocks).to(dtype)

        a = derived_for_compute(owner, f"group-A-{dtype}", tensors, build_a)
        bd = derived_for_compute(owner, f"group-Bd-{dtype}-{self.folded}", tensors, build_bd)
        return a, bd


def _update_blocks(y: torch.Tensor, d: torch.Tensor, b_t: torch.Tensor, scale: float, group: ProjectionGroup,
                   *, by_rows: bool) -> None:
    """y += scale * d @ b_t^T, block by block when R exceeds one kernel tile.

    by_rows: the forward (y [T, N], b_t = Bd [N, R]): each projection's columns of y take its
    adapter's columns of d. Otherwise dX (y [T, in], b_t = A^T [in, R]): every block adds into
    all of y, summing over the adapters.
    """
    if group.rank <= MAX_RANK:
        rank_update_(y, d, b_t, scale)
        return
    for j, r in enumerate(group.ranks):
        if r:
            rows, cols = group.rows(j), group.cols(j)
            if by_rows:
                rank_update_(y[:, rows], d[:, cols], b_t[rows, cols], scale)
            else:
                rank_update_(y, d[:, cols], b_t[:, cols], scale)


def group_forward(x2: torch.Tensor, group: ProjectionGroup) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(Y [T, N], XA [T, R] or None without adapters) for X [T, in], in X's dtype."""
    w = group.dense_weight(x2.dtype, x2.device)
    bias = group.bias(x2.dtype)
    y = x2 @ w.t() if bias is None else torch.addmm(bias, x2, w.t())
    del w
    if not group.rank:
        return y, None
    a, bd = group.adapters(x2.dtype)
    xa = x2 @ a.t()
    _update_blocks(y, xa, bd, group.scale, group, by_rows=True)
    return y, xa


def group_backward(dy: torch.Tensor, x2: torch.Tensor, xa: torch.Tensor | None, group: ProjectionGroup,
                   need_dx: bool) -> tuple[torch.Tensor | None, list[tuple]]:
    """(dX [T, in] or None, [(dbias, dA, dB) per projection]) for dY [T, N].

    Gradients come back in their parameters' dtypes; None where a projection has no such parameter
    (or a frozen bias).
    """
    dx = None
    if need_dx:
        w = group.dense_weight(dy.dtype, dy.device)
        dx = dy @ w
        del w
    grads = []
    if group.rank:
        a, bd = group.adapters(dy.dtype)
        d = dy @ bd  # [T, R]
        if need_dx:
            _update_blocks(dx, d, a.t(), group.scale, group, by_rows=False)
        first = next(p for p in group.parts if p.lora_A is not None)
        d_a = (d.t() @ x2).to(first.lora_A.dtype)  # [R, in]; each adapter's rows are a contiguous block
        if group.scale != 1.0:
            d_a.mul_(group.scale)
        # [N, R], of which only the diagonal blocks are used: one GEMM instead of m, at m times
        # the (small: 2 T N R) arithmetic.
        d_b = (dy.t() @ xa).to(first.lora_B.dtype)
    for j, (_, _, bias, lora_A, lora_B, scaling) in enumerate(group.parts):
        rows = group.rows(j)
        dbias = dy[:, rows].sum(0).to(bias.dtype) if bias is not None and bias.requires_grad else None
        if lora_A is None:
            grads.append((dbias, None, None))
            continue
        cols = group.cols(j)
        d_lora_b = d_b[rows, cols].to(lora_B.dtype)  # a fresh tensor when the dtype changes, else a view
        if float(scaling) != 1.0:  # never scale d_b in place through a view: out of place then
            d_lora_b = d_lora_b.mul(float(scaling)) if d_lora_b._base is not None else d_lora_b.mul_(float(scaling))
        grads.append((dbias, d_a[cols].to(lora_A.dtype), d_lora_b))
    return dx, grads


def warm_up(group: ProjectionGroup, dtype: torch.dtype, device: torch.device) -> None:
    """Run the group's dequantisation and rank updates (forward and dX) once, the updates on
    two-row scratch tensors of the real widths and strides, so a Triton kernel that cannot be
    built on this GPU shows before any autograd state depends on it."""
    group.dense_weight(dtype, device)  # dropped at once: only the build matters
    if not group.rank:
        return
    zeros = functools.partial(torch.zeros, dtype=dtype, device=device)
    d = zeros(2, group.rank)
    _update_blocks(zeros(2, group.out_features), d, zeros(group.out_features, group.rank), group.scale, group,
                   by_rows=True)
    _update_blocks(zeros(2, group.in_features), d, zeros(group.rank, group.in_features).t(), group.scale, group,
                   by_rows=False)


def _reference_weight(p: Projection, dtype: torch.dtype) -> torch.Tensor:
    if p.quant_state is not None:
        return reference_dequantize_nf4(p.weight, p.quant_state, dtype)
    return p.weight.to(dtype)


def reference_group_forward(x2: torch.Tensor, parts: list[tuple]) -> torch.Tensor:
    """Y [T, N] = [Y_1 | ... | Y_m], Y_j = X W_j^T + b_j + s_j (X A_j^T) B_j^T, in plain PyTorch.

    x2: [T, in]; parts: Projections (or as_args() tuples). Computed in x2's dtype, one projection
    at a time, the NF4 weights by `reference_dequantize_nf4`.
    """
    ys = []
    for p in (Projection(*p) for p in parts):
        y = x2 @ _reference_weight(p, x2.dtype).t()
        if p.bias is not None:
            y = y + p.bias.to(x2.dtype)
        if p.lora_A is not None:
            y = y + p.scaling * ((x2 @ p.lora_A.to(x2.dtype).t()) @ p.lora_B.to(x2.dtype).t())
        ys.append(y)
    return torch.cat(ys, dim=1)


def reference_group_backward(dy: torch.Tensor, x2: torch.Tensor, parts: list[tuple]
                             ) -> tuple[torch.Tensor, list[tuple]]:
    """(dX [T, in], [(dbias, dA, dB) per projection]) for dY [T, N], in plain PyTorch:

        dX    = sum_j dY_j W_j + s_j (dY_j B_j) A_j
        dA_j  = s_j (dY_j B_j)^T X        dB_j = s_j dY_j^T (X A_j^T)        dbias_j = sum over T of dY_j

    Computed in dy's dtype; gradients returned in their parameters' dtypes, None where a projection
    has no such parameter (or a frozen bias), as `group_backward` returns them.
    """
    dtype = dy.dtype
    dx = torch.zeros(x2.shape, dtype=dtype, device=dy.device)
    grads = []
    start = 0
    for p in (Projection(*p) for p in parts):
        dy_j = dy[:, start : start + _out_features(p)]
        start += _out_features(p)
        dx = dx + dy_j @ _reference_weight(p, dtype)
        dbias = dy_j.sum(0).to(p.bias.dtype) if p.bias is not None and p.bias.requires_grad else None
        if p.lora_A is None:
            grads.append((dbias, None, None))
            continue
        a, b = p.lora_A.to(dtype), p.lora_B.to(dtype)
        dyb = dy_j @ b  # [T, r]
        dx = dx + p.scaling * (dyb @ a)
        grads.append((dbias, (p.scaling * (dyb.t() @ x2)).to(p.lora_A.dtype),
                      (p.scaling * (dy_j.t() @ (x2 @ a.t()))).to(p.lora_B.dtype)))
    return dx, grads
