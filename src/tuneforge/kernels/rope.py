"""Rotary position embedding: Triton kernel, autograd Function, PyTorch reference, cos/sin builder.

Convention: "rotate_half", as transformers' `apply_rotary_pos_emb`. With the rotary dims of a head
split in halves x = [x1, x2] and cos = [c1, c2], sin = [s1, s2]:

    out1 = x1 * c1 - x2 * s1
    out2 = x2 * c2 + x1 * s2

The backward pass applies the transpose of that map (a rotation by -sin when, as transformers
builds them, both halves of cos/sin are equal):

    dx1 = dy1 * c1 + dy2 * s2
    dx2 = dy2 * c2 - dy1 * s1

In place: `apply_rope` overwrites q and k with their rotation and, in the backward pass, the
incoming gradients with theirs, so no q- or k-sized buffer is allocated in either pass. q and k
are taken in the projections' layout, [batch, seq, heads * head_dim] (or [batch, seq, heads,
head_dim]), because autograd can modify in place only tensors that are not views when a Function
returns more than one output; the attention layer views and transposes the result afterwards.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tuneforge.kernels._utils import check_device, check_float
from tuneforge.kernels.launcher import launch


@triton.jit
def _rotate_heads(
    X, O, stride_xh, stride_oh, n_heads, half, tail,
    c1, c2, s1, s2,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_TAIL: tl.constexpr,
    BACKWARD: tl.constexpr, COPY_TAIL: tl.constexpr,
):
    """Rotate all heads of one token: X, O point at head 0, dim 0 of that token (O may be X).

    In place is safe: every element is loaded and stored by the thread that owns it in these
    [BLOCK_H, BLOCK_D] tiles, and the x1 / x2 halves are disjoint addresses.
    """
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < n_heads) & (d < half)
    x_ptr = X + h * stride_xh + d
    o_ptr = O + h * stride_oh + d
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + half, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    tl.store(o_ptr, o1.to(O.dtype.element_ty), mask=mask)
    tl.store(o_ptr + half, o2.to(O.dtype.element_ty), mask=mask)
    if COPY_TAIL:
        # Out of place with partial rotary (rotary dim < head_dim): the other dims pass through.
        t = tl.arange(0, BLOCK_TAIL)[None, :]
        tail_mask = (h < n_heads) & (t < tail)
        x_tail = tl.load(X + h * stride_xh + 2 * half + t, mask=tail_mask, other=0.0)
        tl.store(O + h * stride_oh + 2 * half + t, x_tail, mask=tail_mask)


@triton.jit
def _rope_kernel(
    Q, K, QO, KO, COS, SIN,
    seq_len, n_q_heads, n_k_heads, half, tail,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_qob, stride_qos, stride_qoh,
    stride_kob, stride_kos, stride_koh,
    stride_cb, stride_cs,
    BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_TAIL: tl.constexpr,
    BACKWARD: tl.constexpr, COPY_TAIL: tl.constexpr,
):
    # One program per (batch, position): cos/sin of that position are loaded once and reused for
    # every q and k head, and q and k share one launch. Strides describe [B, S, H, D] views of
    # the projections (head_dim contiguous), so the [B, S, H * D] outputs are used as they are.
    pid = tl.program_id(0)
    b = (pid // seq_len).to(tl.int64)
    s = (pid % seq_len).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < half
    cs = b * stride_cb + s * stride_cs + d
    c1 = tl.load(COS + cs, mask=dmask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(COS + cs + half, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(SIN + cs, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(SIN + cs + half, mask=dmask, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(
        Q + b * stride_qb + s * stride_qs, QO + b * stride_qob + s * stride_qos,
        stride_qh, stride_qoh, n_q_heads, half, tail, c1, c2, s1, s2,
        BLOCK_QH, BLOCK_D, BLOCK_TAIL, BACKWARD, COPY_TAIL,
    )
    _rotate_heads(
        K + b * stride_kb + s * stride_ks, KO + b * stride_kob + s * stride_kos,
        stride_kh, stride_koh, n_k_heads, half, tail, c1, c2, s1, s2,
        BLOCK_KH, BLOCK_D, BLOCK_TAIL, BACKWARD, COPY_TAIL,
    )


def _heads(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """`t: [B, S, H * D]` or `[B, S, H, D]` as a `[B, S, H, D]` view (no copy)."""
    return t.unflatten(-1, (-1, head_dim)) if t.dim() == 3 else t


def _launch(q, k, q_out, k_out, cos, sin, backward: bool) -> None:
    """Rotate q, k: [B, S, H, D] (unit stride along D) into q_out, k_out (the same tensors in place).

    cos/sin: [B or 1, S, R] with R <= D: only the leading R dims of each head turn.
    """
    batch, seq_len, n_q_heads, head_dim = q.shape
    n_k_heads = k.shape[2]
    rotary = cos.shape[-1]
    half, tail = rotary // 2, head_dim - rotary
    # cos/sin are small ([B, S, R]); contiguous makes their strides equal, so one pair serves both.
    cos, sin = cos.contiguous(), sin.contiguous()
    # cos/sin may have batch 1 (transformers builds them from position_ids of shape [1, S]
    # when no explicit ids are given): broadcast with a zero batch stride.
    stride_cb = 0 if cos.shape[0] == 1 else cos.stride(0)
    block_d = triton.next_power_of_2(half)
    block_qh, block_kh = triton.next_power_of_2(n_q_heads), triton.next_power_of_2(n_k_heads)
    # In place the dims past the rotary ones are simply not touched; out of place they are copied.
    copy_tail = tail > 0 and q_out.data_ptr() != q.data_ptr()
    # Each program holds (Hq + Hk) x D values; more warps once that passes a few thousand.
    num_warps = 4 if (block_qh + block_kh) * block_d <= 4096 else 8
    if batch * seq_len:
        launch(_rope_kernel, (batch * seq_len,),
            q, k, q_out, k_out, cos, sin,
            seq_len, n_q_heads, n_k_heads, half, tail,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            q_out.stride(0), q_out.stride(1), q_out.stride(2),
            k_out.stride(0), k_out.stride(1), k_out.stride(2),
            stride_cb, cos.stride(1),
            BLOCK_QH=block_qh, BLOCK_KH=block_kh, BLOCK_D=block_d,
            BLOCK_TAIL=triton.next_power_of_2(max(tail, 1)), BACKWARD=backward, COPY_TAIL=copy_tail,
            num_warps=num_warps,
        )


def _check_inputs(q, k, cos, sin, head_dim: int, inplace: bool) -> None:
    check_device(q, k, cos, sin)
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_float(name, t)
    layout = "[batch, seq, heads * head_dim] or [batch, seq, heads, head_dim]"
    for name, t in (("q", q), ("k", k)):
        if t.dim() not in (3, 4) or (t.dim() == 4 and t.shape[-1] != head_dim) or t.shape[-1] % head_dim:
            raise ValueError(f"{name} must be {layout} with head_dim {head_dim}, got {tuple(t.shape)}")
        if inplace and t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride along its last dim to be rotated in place")
    batch, seq_len = q.shape[:2]
    if k.shape[:2] != (batch, seq_len):
        raise ValueError(f"k {tuple(k.shape)} must match q {tuple(q.shape)} in batch and seq")
    rotary = cos.shape[-1]
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[0] not in (1, batch) or cos.shape[1] != seq_len:
        raise ValueError(
            f"cos and sin must both be [batch or 1, seq, rotary_dim] = [{batch} or 1, {seq_len}, <= {head_dim}], "
            f"got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    if rotary % 2 or rotary > head_dim:
        raise ValueError(f"the rotary dim (cos.shape[-1] = {rotary}) must be even and at most head_dim {head_dim}")
    if cos.requires_grad or sin.requires_grad:
        raise NotImplementedError("apply_rope does not compute gradients for cos/sin; pass them detached")


class RoPEFunction(torch.autograd.Function):
    """Autograd wrapper: saves only cos and sin (q and k are not needed for the backward).

    apply(q, k, cos, sin, head_dim, inplace) -> (q_rot, k_rot). In place, q and k are marked
    dirty and returned; they must not be views (autograd's rule for in-place Functions with more
    than one output) nor leaves that require grad.
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin, head_dim, inplace):
        _check_inputs(q, k, cos, sin, head_dim, inplace)
        if inplace:
            ctx.mark_dirty(q, k)
            q_out, k_out = q, k
        else:
            q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
            q_out, k_out = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k))
        _launch(_heads(q, head_dim), _heads(k, head_dim), _heads(q_out, head_dim), _heads(k_out, head_dim),
                cos, sin, backward=False)
        ctx.save_for_backward(cos, sin)
        ctx.head_dim = head_dim
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        # The gradients are rotated in place. Autograd hands this node gradients that nothing
        # else reads afterwards in the attention layer (the reshape of the attention's dq / dk);
        # contiguous() copies only an expanded or oddly strided one (e.g. from q_rot.sum()),
        # which must not be written through. An output that did not reach the loss arrives as
        # zeros (materialize_grads is on).
        dq, dk = dq.contiguous(), dk.contiguous()
        dq4, dk4 = _heads(dq, ctx.head_dim), _heads(dk, ctx.head_dim)
        _launch(dq4, dk4, dq4, dk4, cos, sin, backward=True)
        return dq, dk, None, None, None, None


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int, inplace: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q and k with the Triton kernel, in place by default.

    q: [batch, seq, q_heads * head_dim] or [batch, seq, q_heads, head_dim] (the projection's
    output, unit stride along the last dim), k: the same with kv_heads; cos/sin: [batch or 1,
    seq, rotary_dim] as transformers' rotary embedding returns them. rotary_dim < head_dim
    (partial rotary: StableLM, Phi-4-mini) turns only the leading rotary_dim dims of each head.

    inplace=True overwrites q and k and returns them. Autograd allows that only for tensors that
    are not views (nor leaves requiring grad): pass views, e.g. slices of one packed qkv
    projection or outputs viewed inside another autograd Function, with inplace=False, which
    returns new contiguous tensors. Returns (q_rot, k_rot) shaped like q and k.

    Either way the backward rotates the gradient it receives in its own storage: a gradient the
    caller hands in for q_rot / k_rot (autograd.grad's grad_outputs) is overwritten, and where an
    op hands one gradient tensor to q_rot and to another input (q_rot + t), t's gradient may come
    out rotated. In the attention layer q_rot and k_rot only reach the per-head view, whose
    gradients are fresh tensors.
    """
    return RoPEFunction.apply(q, k, cos, sin, head_dim, inplace)


def reference_apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch rotate_half RoPE, the operations of transformers' apply_rotary_pos_emb.

    q: [B, Hq, S, D], k: [B, Hk, S, D], cos/sin: [B or 1, S, R] (out of place). With R < D only
    the leading R dims turn and the rest are concatenated back, as transformers' partial-rotary
    models (StableLM, Phi-3 with partial_rotary_factor) do.
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotary = cos.shape[-1]

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def rotate(x):
        if rotary < x.shape[-1]:
            x_rot, x_pass = x[..., :rotary], x[..., rotary:]
            return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)
        return x * cos + rotate_half(x) * sin

    return rotate(q), rotate(k)
