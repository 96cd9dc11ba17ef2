"""Mixture-of-experts experts: tokens grouped by expert, stacked (dense or NF4) weights, LoRA on the
stacked weights, in one autograd Function; and `reference_moe`, the same maths in plain PyTorch.

transformers 5 stores a layer's E experts as two stacked 3-D parameters (`gate_up_proj`,
`down_proj`) and runs them token group by token group. For the rows X_e routed to expert e (with
routing weights w), and peft's LoRA on the stacked parameters (`target_parameters`: A_e [r, in],
B_e [out, r], scaling s):

    G_e = X_e W1_e^T + b1_e + s1 (X_e A1_e^T) B1_e^T          [n_e, 2I]   (gate | up, or interleaved)
    H_e = gate(G_e)                                             [n_e, I]    (the experts module's own
                                                                             `_apply_gate`: SwiGLU, or
                                                                             gpt-oss's clamped one)
    Y_e = H_e W2_e^T + b2_e + s2 (H_e A2_e^T) B2_e^T            [n_e, hidden]
    out[token] += w * Y_e

peft computes the same thing by materialising W + s B A for every expert and running
transformers' forward on it; autograd then keeps those dense weights (and, in 4-bit, the
dequantised ones) alive until the backward. `MoEExperts` never forms W + s B A: it dequantises
each stacked NF4 weight once per pass (one launch for the whole stack, blocks never straddling
two experts), keeps the LoRA terms factored, saves only the sort order, G and Y per routed row,
and dequantises again in the backward. Its backward:

    dY = w * dout[token]            dw = <dout[token], Y>
    dH = dY W2_e + s2 (dY B2_e) A2_e       dA2_e = s2 (dY B2_e)^T H_e      dB2_e = s2 dY^T (H_e A2_e^T)
    dG = gate'(G_e)^T dH  (autograd through `_apply_gate` on the saved G_e)
    dX = dG W1_e + s1 (dG B1_e) A1_e       dA1_e = s1 (dG B1_e)^T X_e      dB1_e = s1 dG^T (X_e A1_e^T)

Each matmul above is one grouped matmul over all experts (torch's grouped_mm: the rows sorted by
expert, an offset per expert; weight gradients as its K-grouped form) where the operands are
16-byte aligned (and on CUDA 16-bit, sm80+), else a loop over the experts that have rows.

Frozen weights and biases get no gradient. Routing (the router, its top-k and softmax) stays in
the family's own module; this op starts from its (top_k_index, top_k_weights).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

__all__ = ["ExpertProjection", "MoEExperts", "moe_experts", "reference_moe"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpertProjection:
    """One stacked projection of E experts: y = x W_e^T + b_e + s (x A_e^T) B_e^T for rows routed to e.

    weight:     dense [E, out, in], or [E, in, out] when `transposed` (gpt-oss stores x @ W);
                None when `nf4` holds the weight.
    nf4:        (packed uint8 [E*out*in/2], QuantState) of the stack flattened in its stored
                orientation (bitsandbytes NF4 layout, see kernels/nf4.py); quant_state.shape is
                the stored 3-D shape.
    bias:       [E, out] or None (frozen).
    lora_A:     [E, r, in] or None (peft's lora_A.weight [r*E, in], reshaped);
    lora_B:     [E, out, r] (peft's lora_B.weight [out, r*E] as peft's `get_delta_factors` reads it).
    scaling:    s = lora_alpha / r (or / sqrt(r)).
    transposed: the stored orientation of `weight` / `nf4`.
    """

    weight: torch.Tensor | None = None
    nf4: tuple | None = None
    bias: torch.Tensor | None = None
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None
    scaling: float = 1.0
    transposed: bool = False

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """All experts' base weights as [E, out, in] in `dtype` (a view when nothing is converted)."""
        if self.nf4 is not None:
            packed, quant_state = self.nf4
            stored = dequantize_stack(packed, quant_state, dtype)
        else:
            stored = self.weight if self.weight.dtype == dtype else self.weight.to(dtype)
        return stored.transpose(1, 2) if self.transposed else stored

    def without_lora(self) -> "ExpertProjection":
        return replace(self, lora_A=None, lora_B=None)


def dequantize_stack(packed: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """The dense stored-shape stack of an NF4 expert weight: the Triton kernel on a GPU (one launch
    for all experts), its bit-identical PyTorch reference on the CPU (where Triton only interprets)."""
    from tuneforge.kernels.nf4 import dequantize_nf4, reference_dequantize_nf4

    if packed.is_cuda:
        return dequantize_nf4(packed, quant_state, dtype)
    return reference_dequantize_nf4(packed, quant_state, dtype)


class Groups:
    """The routed rows sorted by expert: order [T*K] (stable), the token of each sorted row, each
    expert's end offset [E] (int32, grouped_mm's `offs`). Computed without reading anything on the
    host, so a decode step can be captured in a CUDA graph; only the per-expert loop (operands
    grouped_mm cannot take) asks for `bounds`, one device sync."""

    def __init__(self, top_k_index: torch.Tensor, num_experts: int):
        flat = top_k_index.reshape(-1)
        self.order = torch.argsort(flat, stable=True)
        self.rows = self.order // top_k_index.shape[-1]
        self.experts_of_rows = flat[self.order]
        counts = torch.zeros(num_experts, dtype=torch.int32, device=flat.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        self.offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        self._bounds = None

    @property
    def bounds(self) -> list[tuple[int, int, int]]:
        """(expert, start, end) of every expert that has rows."""
        if self._bounds is None:
            ends = self.offsets.tolist()
            starts = [0, *ends[:-1]]
            self._bounds = [(e, a, b) for e, (a, b) in enumerate(zip(starts, ends)) if b > a]
        return self._bounds


def _aligned(t: torch.Tensor) -> bool:
    """Whether torch's grouped_mm takes `t`: a unit stride in one of the last two dims, every other
    stride and the start 16-byte aligned."""
    strides = t.stride()
    if 1 not in strides[-2:] or t.data_ptr() % 16:
        return False
    return all(stride == 1 or (stride * t.element_size()) % 16 == 0 for stride in strides)


def _grouped(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.nn.functional.grouped_mm for these operands (else the per-expert loop): CPU, or CUDA
    16-bit on sm80+; every operand aligned."""
    if not hasattr(torch.nn.functional, "grouped_mm") or not (_aligned(a) and _aligned(b)):
        return False
    if a.is_cuda:
        return a.dtype in (torch.bfloat16, torch.float16) and torch.cuda.get_device_capability(a.device) >= (8, 0)
    return a.device.type == "cpu"


# Operand layouts (strides, dtypes) grouped_mm refused on this device: the loop serves them.
_REFUSED: set[tuple] = set()


def _try_grouped(a: torch.Tensor, b: torch.Tensor, groups: Groups) -> torch.Tensor | None:
    """grouped_mm(a, b) when `_grouped` allows it and the backend takes the layout, else None.

    The backends check more than alignment (CUDA's wants some operands in a given major order);
    a layout one refuses is logged once and falls to the loop from then on.
    """
    if not _grouped(a, b):
        return None
    key = (a.device.type, a.dtype, a.dim(), b.dim(), a.stride()[-2:] == (1, a.shape[-2]),
           b.stride()[-2:] == (1, b.shape[-2]))
    if key in _REFUSED:
        return None
    try:
        return torch.nn.functional.grouped_mm(a, b, offs=groups.offsets)
    except RuntimeError as error:
        _REFUSED.add(key)
        logger.warning("grouped_mm refused operands %s x %s (%s); the per-expert loop computes them",
                       tuple(a.shape), tuple(b.shape), str(error).splitlines()[0])
        return None


def _gmm(x: torch.Tensor, w: torch.Tensor, groups: Groups) -> torch.Tensor:
    """Rows of x grouped by expert times their expert's matrix: x [N, k], w [E, k, n] -> [N, n]."""
    out = _try_grouped(x, w, groups)
    if out is not None:
        return out
    out = x.new_zeros(x.shape[0], w.shape[-1])
    for e, start, end in groups.bounds:
        out[start:end] = x[start:end] @ w[e]
    return out


def _gmm_outer(a: torch.Tensor, b: torch.Tensor, groups: Groups) -> torch.Tensor:
    """Per expert a_e^T b_e over its rows (a weight gradient): a [N, m], b [N, n] -> [E, m, n]."""
    out = _try_grouped(a.t(), b, groups)
    if out is not None:
        return out
    out = a.new_zeros(groups.offsets.shape[0], a.shape[1], b.shape[1])
    for e, start, end in groups.bounds:
        out[e] = a[start:end].t() @ b[start:end]
    return out


def _project(x, projection: ExpertProjection, a, b, groups: Groups, dtype):
    """x W_e^T + b_e + s (x A_e^T) B_e^T for rows x [N, in] sorted by expert -> [N, out]."""
    out = _gmm(x, projection.dense(dtype).transpose(1, 2), groups)
    if projection.bias is not None:
        out = out + projection.bias.to(dtype)[groups.experts_of_rows]
    if a is not None:
        xa = _gmm(x, a.transpose(1, 2), groups)  # [N, r]
        out = out + _gmm(xa * projection.scaling, b.transpose(1, 2), groups)
    return out


def _project_back(d, x, projection: ExpertProjection, a, b, groups: Groups, dtype):
    """The backward of `_project`: (d x [N, in], d a [E, r, in] or None, d b [E, out, r] or None)
    from d out [N, out]."""
    dx = _gmm(d, projection.dense(dtype), groups)  # W_e [out, in] read as [k=out, n=in]
    if a is None:
        return dx, None, None
    db_rows = _gmm(d, b, groups) * projection.scaling  # [N, r] = s d B_e
    dx = dx + _gmm(db_rows, a, groups)
    grad_a = _gmm_outer(db_rows, x, groups)
    grad_b = _gmm_outer(d * projection.scaling, _gmm(x, a.transpose(1, 2), groups), groups)
    return dx, grad_a, grad_b


class MoEExperts(torch.autograd.Function):
    """Forward: hidden [T, H], top_k_index [T, K], top_k_weights [T, K] -> [T, H] (hidden's dtype).

    The base projections come in as `ExpertProjection`s without LoRA (their weights frozen); the
    LoRA factors A1, B1, A2, B2 ([E, r, in], [E, out, r]) are arguments of their own so autograd
    returns their gradients. Computes in `compute_dtype`. Every matmul is one grouped matmul over
    all experts (torch's grouped_mm) where the operands allow it, else a loop over the experts
    that have rows.
    """

    @staticmethod
    def forward(ctx, hidden, top_k_index, top_k_weights, gate_up, down, apply_gate, compute_dtype, a1, b1, a2, b2):
        num_experts = (gate_up.nf4[1].shape if gate_up.nf4 is not None else gate_up.weight.shape)[0]
        groups = Groups(top_k_index, num_experts)
        lora = [None if t is None else t.to(compute_dtype).contiguous() for t in (a1, b1, a2, b2)]
        x = hidden.to(compute_dtype)[groups.rows]  # [T*K, H] sorted by expert
        g = _project(x, gate_up, lora[0], lora[1], groups, compute_dtype)
        y = _project(apply_gate(g), down, lora[2], lora[3], groups, compute_dtype)
        weights_sorted = top_k_weights.reshape(-1)[groups.order]
        # As transformers: the expert output times its routing weight in their promoted dtype (fp32
        # for Mixtral's fp32 weights), then cast and summed into the tokens.
        out = torch.zeros_like(hidden)
        out.index_add_(0, groups.rows, (y * weights_sorted[:, None]).to(hidden.dtype))
        ctx.save_for_backward(hidden, g, y, weights_sorted, a1, b1, a2, b2)
        ctx.groups, ctx.projections, ctx.apply_gate, ctx.compute_dtype = groups, (gate_up, down), apply_gate, compute_dtype
        ctx.weights_shape, ctx.weights_dtype = top_k_weights.shape, top_k_weights.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, g, y, weights_sorted, a1, b1, a2, b2 = ctx.saved_tensors
        dtype, groups, (gate_up, down) = ctx.compute_dtype, ctx.groups, ctx.projections
        rows = groups.rows
        lora = [None if t is None else t.to(dtype).contiguous() for t in (a1, b1, a2, b2)]
        d_out = grad_out[rows]  # [T*K, H], the output's dtype
        grad_weights = None
        if ctx.needs_input_grad[2]:
            dw_sorted = (d_out.float() * y.float()).sum(-1)
            grad_weights = torch.empty_like(dw_sorted)
            grad_weights[groups.order] = dw_sorted
            grad_weights = grad_weights.reshape(ctx.weights_shape).to(ctx.weights_dtype)
        dy = (d_out * weights_sorted[:, None]).to(dtype)
        with torch.enable_grad():
            g = g.detach().requires_grad_(True)
            h = ctx.apply_gate(g)  # recomputed: [N, I] is cheaper to redo than to keep
        dh, grad_a2, grad_b2 = _project_back(dy, h.detach(), down, lora[2], lora[3], groups, dtype)
        (dg,) = torch.autograd.grad(h, g, dh)
        dx, grad_a1, grad_b1 = _project_back(dg, hidden.to(dtype)[rows], gate_up, lora[0], lora[1], groups, dtype)
        grad_hidden = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device).index_add_(0, rows, dx)
        lora_grads = [None if grad is None else grad.to(t.dtype)
                      for grad, t in zip((grad_a1, grad_b1, grad_a2, grad_b2), (a1, b1, a2, b2))]
        return (grad_hidden.to(hidden.dtype), None, grad_weights, None, None, None, None, *lora_grads)


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on (as the fused LoRA ops), else hidden's dtype."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return hidden.dtype


def moe_experts(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                gate_up: ExpertProjection, down: ExpertProjection, apply_gate) -> torch.Tensor:
    """The experts' output for routed tokens, by `MoEExperts`.

    hidden: [T, H]; top_k_index: [T, K] expert ids; top_k_weights: [T, K] routing weights;
    gate_up / down: the two stacked projections (dense or NF4, optional LoRA and bias);
    apply_gate: [n, 2I] -> [n, I], the experts module's `_apply_gate`.
    Returns [T, H] in hidden's dtype.
    """
    for projection in (gate_up, down):
        if projection.weight is not None and projection.weight.requires_grad:
            raise ValueError("moe_experts computes frozen expert weights (LoRA or QLoRA); a trainable "
                             "stacked weight (full fine-tuning) takes transformers' own experts forward")
    with torch.autocast(hidden.device.type, enabled=False):
        return MoEExperts.apply(hidden, top_k_index, top_k_weights, gate_up.without_lora(), down.without_lora(),
                                apply_gate, _compute_dtype(hidden), gate_up.lora_A, gate_up.lora_B,
                                down.lora_A, down.lora_B)


def reference_moe(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                  gate_up: ExpertProjection, down: ExpertProjection, apply_gate) -> torch.Tensor:
    """`moe_experts` in plain differentiable PyTorch, computed as transformers + peft do: each
    stacked weight becomes W + s B A for all experts (dequantised first when NF4), then
    transformers' eager loop over the experts that have tokens. Same arguments, same result."""
    dtype = _compute_dtype(hidden)

    def effective(projection):
        weight = projection.dense(dtype)  # [E, out, in]
        if projection.lora_A is not None:
            weight = weight + projection.scaling * (projection.lora_B.to(dtype) @ projection.lora_A.to(dtype))
        return weight

    w1, w2 = effective(gate_up), effective(down)
    out = torch.zeros_like(hidden)
    x = hidden.to(dtype)
    for e in torch.unique(top_k_index).tolist():
        token, slot = torch.where(top_k_index == e)
        g = x[token] @ w1[e].t()
        if gate_up.bias is not None:
            g = g + gate_up.bias[e].to(dtype)
        y = apply_gate(g) @ w2[e].t()
        if down.bias is not None:
            y = y + down.bias[e].to(dtype)
        out = out.index_add(0, token, (y * top_k_weights[token, slot, None]).to(hidden.dtype))
    return out
