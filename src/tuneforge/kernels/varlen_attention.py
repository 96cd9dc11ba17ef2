"""Variable-length causal attention over padding-free batches: flash varlen on CUDA, and the reference.

A padding-free batch is one row of T tokens holding N samples end to end; cu_seqlens [N+1]
(int32, cu_seqlens[0] = 0, cu_seqlens[N] = T) marks where each starts. Each sample attends to
itself only, causally:

    out[t] = softmax(scale * q[t] . k[s]^T  for s in [start(t), t] (and t - s < window)) . v[s]

    q: [T, Hq, D], k and v: [T, Hk, D] with Hq a multiple of Hk (GQA: q head h reads kv head h // (Hq/Hk)),
    out: [T, Hq, D].

Why not transformers' path: for SDPA it turns restarting position_ids into a [T, T] block-diagonal
mask, which rules out the flash kernel and makes attention quadratic over the whole packed row
(a 16k-token row of ~400-token samples does ~40x the attention work of the samples alone, and the
mask alone is 256 MB). FlashAttention-2's varlen kernel reads cu_seqlens and does only the
per-sample work; torch ships it as aten::_flash_attention_forward / _backward (the ops behind
SDPA's flash backend), so no extra package is needed.

The CUDA path needs fp16/bf16, head_dim <= 256 and a multiple of 8, no logit soft-capping (the
kernel has none) and no attention dropout; anything else, and the CPU, runs the reference: a loop
over samples with SDPA per sample (still linear in the number of samples, not quadratic in T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _window_sizes(sliding_window: int | None) -> dict:
    # transformers' sliding window W lets token t see keys s with t - s < W: W - 1 to the left.
    if sliding_window is None:
        return {}
    return {"window_size_left": int(sliding_window) - 1, "window_size_right": 0}


class _FlashVarlen(torch.autograd.Function):
    """aten's flash varlen forward/backward as one autograd Function (q, k, v: [T, H, D], contiguous)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale, sliding_window):
        window = _window_sizes(sliding_window)
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, True, False, scale=scale, **window,
        )
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, rng_state, unused)
        ctx.max_seqlen, ctx.scale, ctx.window = max_seqlen, scale, window
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens, rng_state, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, cu_seqlens, ctx.max_seqlen, ctx.max_seqlen,
            0.0, True, rng_state, unused, scale=ctx.scale, **ctx.window,
        )
        return dq, dk, dv, None, None, None, None


def flash_varlen_supported(q: torch.Tensor, softcap: float | None = None, dropout: float = 0.0) -> bool:
    """Whether `varlen_attention` runs the flash kernel for tensors like q (else the reference)."""
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 256
        and not softcap
        and not dropout
    )


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, scale: float, sliding_window: int | None = None,
                     softcap: float | None = None, dropout: float = 0.0) -> torch.Tensor:
    """Causal attention of each sample with itself; q [T, Hq, D], k/v [T, Hk, D] -> [T, Hq, D].

    cu_seqlens: [N+1] sample boundaries on q's device (int32); max_seqlen: the longest sample (a
    host int, so the kernel launch needs no device sync).
    """
    if flash_varlen_supported(q, softcap, dropout):
        return _FlashVarlen.apply(q.contiguous(), k.contiguous(), v.contiguous(),
                                  cu_seqlens.to(device=q.device, dtype=torch.int32), int(max_seqlen), float(scale),
                                  sliding_window)
    return reference_varlen_attention(q, k, v, cu_seqlens, scale, sliding_window, softcap, dropout)


def reference_varlen_attention(q, k, v, cu_seqlens, scale, sliding_window=None, softcap=None, dropout=0.0):
    """Each sample through plain attention on its own (SDPA, or the eager formula with soft-capping)."""
    bounds = cu_seqlens.tolist()
    groups = q.shape[1] // k.shape[1]
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [H, n, D]
        ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        n = end - start
        if sliding_window is None and not softcap:
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                       dropout_p=dropout).transpose(0, 1))
            continue
        scores = (qs.float() @ ks.float().transpose(-1, -2)) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        t = torch.arange(n, device=q.device)
        allowed = t[:, None] >= t[None, :]
        if sliding_window is not None:
            allowed &= (t[:, None] - t[None, :]) < sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = F.dropout(scores.softmax(-1), p=dropout) if dropout else scores.softmax(-1)
        outs.append((probs @ vs.float()).to(q.dtype).transpose(0, 1))
    return torch.cat(outs, 0)
