"""Causal attention with logit soft-capping (Gemma 2) over padding-free rows: a Triton flash kernel.

    scores = cap * tanh(scale * q . k^T / cap)          (cap: attn_logit_softcapping, 50 for Gemma 2)
    out[t] = softmax(scores[t, s] for s in [start(t), t], t - s < window) . v[s]

Layout as kernels/varlen_attention.py: q [T, Hq, D], k/v [T, Hk, D] (GQA: q head h reads kv head
h // (Hq/Hk)), cu_seqlens [N+1] int32 sample boundaries, max_seqlen a host int. A dense batch
[B, S] is the same with cu_seqlens = 0, S, 2S, ...

Why: no flash kernel in torch takes a soft-cap, so Gemma 2 trained through transformers' eager
attention: [B, H, S, S] fp32 scores written, soft-capped, soft-maxed and read back per layer, and
the padding-free (packed) path looped over samples in Python. This kernel never forms the scores
in memory: FlashAttention-2's online softmax (forward), then two backward kernels that recompute
the probabilities from the saved log-sum-exp, one over key blocks (dK, dV: per q head, summed over
the GQA group afterwards, no atomics) and one over query blocks (dQ). The soft-cap's derivative is
d/ds [cap * tanh(s / cap)] = 1 - tanh^2(s / cap), applied to dP's softmax gradient.

Reference: `reference_softcap_attention` (each sample through the eager formula in fp32).
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from tuneforge.kernels._utils import check_device
from tuneforge.kernels.launcher import launch
from tuneforge.kernels.varlen_attention import reference_varlen_attention
from tuneforge.switches import TRITON_INTERPRETER

logger = logging.getLogger(__name__)


@triton.jit
def _tanh(x):
    # 1 - 2 / (exp(2x) + 1): exact at both ends (exp overflows to inf -> 1, underflows to 0 -> -1).
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _tile(base, begin, index, head, stride_t, stride_h, offs_d, mask):
    """Rows `begin + index` of one head of a [T, H, D] tensor, zeros where masked."""
    return tl.load(base + (begin + index)[:, None] * stride_t + head * stride_h + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _scores(q, k, rows, cols, n_tok, scale, softcap, window,
            HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """(capped scores with -inf where not allowed, tanh term for the backward) of one [M, N] tile."""
    s = tl.dot(q, tl.trans(k)) * scale
    t = s
    if HAS_SOFTCAP:
        t = _tanh(s / softcap)
        s = softcap * t
    allowed = (cols[None, :] <= rows[:, None]) & (cols[None, :] < n_tok) & (rows[:, None] < n_tok)
    if HAS_WINDOW:
        allowed = allowed & ((rows[:, None] - cols[None, :]) < window)
    return tl.where(allowed, s, float("-inf")), t


@triton.jit
def _keys_of_query_block(start_m, n_tok, window, HAS_WINDOW: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi): the key positions query block `start_m` can attend to (causal, sliding window),
    lo rounded down to a key block."""
    hi = tl.minimum(n_tok, (start_m + 1) * BLOCK_M)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(0, start_m * BLOCK_M - window + 1) // BLOCK_N * BLOCK_N
    return lo, hi


@triton.jit
def _row_stats(LSE, DELTA, h, stride_lh, begin, rows, row_ok):
    """The forward's log-sum-exp and the backward's delta of rows `begin + rows` of head h."""
    lse = tl.load(LSE + h * stride_lh + begin + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + h * stride_lh + begin + rows, mask=row_ok, other=0.0)
    return lse, delta


@triton.jit
def _probs_and_grad(s, t, lse, delta, do, v, HAS_SOFTCAP: tl.constexpr):
    """(P, dS) of one tile: P recomputed from the saved log-sum-exp (exactly 0 where s = -inf),
    dS = P (dO V^T - delta), times the cap's derivative 1 - tanh^2."""
    p = tl.exp(s - lse[:, None])
    ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
    if HAS_SOFTCAP:
        ds = ds * (1.0 - t * t)
    return p, ds


@triton.jit
def _forward_kernel(Q, K, V, O, LSE, CU, scale, softcap, window,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh, stride_lh,
                    GROUP, D,
                    HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0)
    seq = tl.program_id(1)
    h = tl.program_id(2)
    begin = tl.load(CU + seq)
    n_tok = tl.load(CU + seq + 1) - begin
    if start_m * BLOCK_M < n_tok:
        kvh = h // GROUP
        rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        row_ok = rows < n_tok
        q = _tile(Q, begin, rows, h, stride_qt, stride_qh, offs_d, row_ok[:, None] & d_ok[None, :])
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        lo, hi = _keys_of_query_block(start_m, n_tok, window, HAS_WINDOW, BLOCK_M, BLOCK_N)
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            kv_mask = (cols < n_tok)[:, None] & d_ok[None, :]
            k = _tile(K, begin, cols, kvh, stride_kt, stride_kh, offs_d, kv_mask)
            v = _tile(V, begin, cols, kvh, stride_kt, stride_kh, offs_d, kv_mask)
            s, _ = _scores(q, k, rows, cols, n_tok, scale, softcap, window, HAS_SOFTCAP, HAS_WINDOW)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with nothing allowed yet (sliding window) keeps m = -inf: shift by 0 instead.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        tl.store(O + (begin + rows)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE + h * stride_lh + begin + rows, m_i + tl.log(l_safe), mask=row_ok)


@triton.jit
def _backward_kv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU, scale, softcap, window,
                        stride_qt, stride_qh, stride_kt, stride_kh, stride_gt, stride_gh, stride_lh,
                        GROUP, D,
                        HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dK, dV of one key block for one q head (q's stride layout also serves dO)."""
    start_n = tl.program_id(0)
    seq = tl.program_id(1)
    h = tl.program_id(2)
    begin = tl.load(CU + seq)
    n_tok = tl.load(CU + seq + 1) - begin
    if start_n * BLOCK_N < n_tok:
        kvh = h // GROUP
        cols = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        kv_mask = (cols < n_tok)[:, None] & d_ok[None, :]
        k = _tile(K, begin, cols, kvh, stride_kt, stride_kh, offs_d, kv_mask)
        v = _tile(V, begin, cols, kvh, stride_kt, stride_kh, offs_d, kv_mask)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        lo = start_n * BLOCK_N // BLOCK_M * BLOCK_M
        hi = n_tok
        if HAS_WINDOW:
            hi = tl.minimum(n_tok, (start_n + 1) * BLOCK_N + window - 1)
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < n_tok
            q_mask = row_ok[:, None] & d_ok[None, :]
            q = _tile(Q, begin, rows, h, stride_qt, stride_qh, offs_d, q_mask)
            do = _tile(DO, begin, rows, h, stride_qt, stride_qh, offs_d, q_mask)
            lse, delta = _row_stats(LSE, DELTA, h, stride_lh, begin, rows, row_ok)
            s, t = _scores(q, k, rows, cols, n_tok, scale, softcap, window, HAS_SOFTCAP, HAS_WINDOW)
            p, ds = _probs_and_grad(s, t, lse, delta, do, v, HAS_SOFTCAP)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        out_mask = (cols < n_tok)[:, None] & d_ok[None, :]
        tl.store(DK + (begin + cols)[:, None] * stride_gt + h * stride_gh + offs_d[None, :], dk * scale, mask=out_mask)
        tl.store(DV + (begin + cols)[:, None] * stride_gt + h * stride_gh + offs_d[None, :], dv, mask=out_mask)


@triton.jit
def _backward_q_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU, scale, softcap, window,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_lh,
                       GROUP, D,
                       HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dQ of one query block (dQ shares q's layout)."""
    start_m = tl.program_id(0)
    seq = tl.program_id(1)
    h = tl.program_id(2)
    begin = tl.load(CU + seq)
    n_tok = tl.load(CU + seq + 1) - begin
    if start_m * BLOCK_M < n_tok:
        kvh = h // GROUP
        rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        row_ok = rows < n_tok
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = _tile(Q, begin, rows, h, stride_qt, stride_qh, offs_d, q_mask)
        do = _tile(DO, begin, rows, h, stride_qt, stride_qh, offs_d, q_mask)
        lse, delta = _row_stats(LSE, DELTA, h, stride_lh, begin, rows, row_ok)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        lo, hi = _keys_of_query_block(start_m, n_tok, window, HAS_WINDOW, BLOCK_M, BLOCK_N)
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            kv_mask = (cols < n_tok)[:, None] & d_ok[None, :]
            k = _tile(K, begin, cols, kvh, stride_kt, stride_kh, offs_d, kv_mask)
            v = _tile(V, begin, cols, kvh, stride_kt, stride_kh, offs_d, kv_mask)
            s, t = _scores(q, k, rows, cols, n_tok, scale, softcap, window, HAS_SOFTCAP, HAS_WINDOW)
            _, ds = _probs_and_grad(s, t, lse, delta, do, v, HAS_SOFTCAP)
            dq += tl.dot(ds.to(k.dtype), k)
        tl.store(DQ + (begin + rows)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                 (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


def _blocks(head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps). Under the interpreter every program runs in numpy,
    one after another: small tiles keep tests fast. On a GPU, head_dim 256 (Gemma 2) halves the
    tiles so that q, k, v and the fp32 accumulators fit the shared memory and registers."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if TRITON_INTERPRETER:
        return 16, 16, block_d, 1
    if block_d >= 256:
        return 32, 32, block_d, 8
    return 64, 64, block_d, 4


def _window(sliding_window: int | None) -> tuple[bool, int]:
    return (sliding_window is not None, int(sliding_window or 0))


class _SoftcapAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale, softcap, sliding_window):
        tokens, heads, dim = q.shape
        group = heads // k.shape[1]
        block_m, block_n, block_d, warps = _blocks(dim)
        has_window, window = _window(sliding_window)
        out = torch.empty_like(q)
        lse = torch.empty((heads, tokens), dtype=torch.float32, device=q.device)
        samples = cu_seqlens.numel() - 1
        grid = (triton.cdiv(max_seqlen, block_m), samples, heads)
        launch(_forward_kernel, grid, q, k, v, out, lse, cu_seqlens, scale, float(softcap or 1.0), window,
               q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0), out.stride(1), lse.stride(0),
               group, dim, HAS_SOFTCAP=bool(softcap), HAS_WINDOW=has_window,
               BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.args = (max_seqlen, scale, softcap, sliding_window)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        max_seqlen, scale, softcap, sliding_window = ctx.args
        tokens, heads, dim = q.shape
        kv_heads = k.shape[1]
        group = heads // kv_heads
        block_m, block_n, block_d, warps = _blocks(dim)
        has_window, window = _window(sliding_window)
        grad_out = grad_out.contiguous()
        # delta = rowsum(dO * O): the softmax backward's per-row term, [H, T] like the lse.
        delta = (grad_out.float() * out.float()).sum(-1).transpose(0, 1).contiguous()
        dq = torch.empty_like(q)
        # Per q head, summed over the GQA group below: no two programs write the same element.
        dk_heads = torch.empty((tokens, heads, dim), dtype=torch.float32, device=q.device)
        dv_heads = torch.empty_like(dk_heads)
        samples = cu_seqlens.numel() - 1
        common = dict(HAS_SOFTCAP=bool(softcap), HAS_WINDOW=has_window, BLOCK_M=block_m, BLOCK_N=block_n,
                      BLOCK_D=block_d, num_warps=warps)
        launch(_backward_kv_kernel, (triton.cdiv(max_seqlen, block_n), samples, heads),
               q, k, v, grad_out, lse, delta, dk_heads, dv_heads, cu_seqlens, scale, float(softcap or 1.0), window,
               q.stride(0), q.stride(1), k.stride(0), k.stride(1), dk_heads.stride(0), dk_heads.stride(1),
               lse.stride(0), group, dim, **common)
        launch(_backward_q_kernel, (triton.cdiv(max_seqlen, block_m), samples, heads),
               q, k, v, grad_out, lse, delta, dq, cu_seqlens, scale, float(softcap or 1.0), window,
               q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0), group, dim, **common)
        dk = dk_heads.view(tokens, kv_heads, group, dim).sum(2).to(k.dtype)
        dv = dv_heads.view(tokens, kv_heads, group, dim).sum(2).to(v.dtype)
        return dq, dk, dv, None, None, None, None, None


def softcap_supported(head_dim: int, heads: int, kv_heads: int, dtype: torch.dtype,
                      device: torch.device) -> str | None:
    """Why the kernel cannot run attention of this shape here (None: it can). Runs it once, forward
    and backward, on two samples spanning several tiles, against the reference: a kernel this GPU
    cannot compile (registers, shared memory) or computes wrongly shows before any training step
    depends on it."""
    device = torch.device(device)
    if device.type != "cuda" and not TRITON_INTERPRETER:
        return f"tensors on {device.type} (Triton runs on CUDA, or on the CPU only under TRITON_INTERPRET=1)"
    if head_dim > 256:
        return f"head_dim {head_dim} > 256"
    if heads % kv_heads:
        return f"{heads} query heads are not a multiple of {kv_heads} key/value heads"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype}"
    lengths = (40, 90) if TRITON_INTERPRETER else (70, 200)
    generator = torch.Generator().manual_seed(0)  # local: the caller's random state is left alone
    inputs = [(torch.randn(sum(lengths), h, head_dim, generator=generator) * 2).to(device=device, dtype=dtype)
              for h in (heads, kv_heads, kv_heads)]
    grad = torch.randn(sum(lengths), heads, head_dim, generator=generator).to(device=device, dtype=dtype)
    cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32, device=device)
    results = []
    try:
        for fn in (softcap_attention, reference_softcap_attention):
            q, k, v = (t.detach().clone().requires_grad_(True) for t in inputs)
            out = fn(q, k, v, cu, max(lengths), head_dim ** -0.5, 30.0, 48)
            grads = torch.autograd.grad(out, (q, k, v), grad)
            results.append([out.detach().float(), *(g.float() for g in grads)])
    except Exception as error:  # noqa: BLE001 - any build or launch failure means: not here
        return f"the kernel does not build or run here ({type(error).__name__}: {str(error)[:200]})"
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2  # of each result's largest magnitude
    for name, got, want in zip(("output", "dq", "dk", "dv"), *results):
        error = float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))
        if not error <= tolerance:
            return f"its {name} differs from the reference by {error:.2g} of its scale on this device"
    return None


def softcap_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                      scale: float, softcap: float | None, sliding_window: int | None = None) -> torch.Tensor:
    """Causal per-sample attention with soft-capped logits; q [T, Hq, D], k/v [T, Hk, D] -> [T, Hq, D].

    cu_seqlens: [N+1] int32 sample boundaries on q's device; max_seqlen: the longest sample (host
    int, sizes the grid; a larger value only launches programs that exit at once).
    softcap: the cap (None or 0: plain softmax attention).
    """
    check_device(q, k, v)
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    return _SoftcapAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), cu, int(max_seqlen),
                                   float(scale), softcap, sliding_window)


def dense_softcap_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, softcap: float | None,
                            sliding_window: int | None = None) -> torch.Tensor:
    """The same for a dense batch without padding: q [B, Hq, S, D], k/v [B, Hk, S, D] (transformers'
    layout) -> [B, S, Hq, D] (the layout attention interfaces return)."""
    batch, heads, seq, dim = q.shape
    flat = [t.transpose(1, 2).reshape(batch * seq, t.shape[1], dim) for t in (q, k, v)]
    cu = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=q.device)
    return softcap_attention(*flat, cu, seq, scale, softcap, sliding_window).view(batch, seq, heads, dim)


def reference_softcap_attention(q, k, v, cu_seqlens, max_seqlen, scale, softcap, sliding_window=None):
    """Each sample on its own through the eager formula (fp32 scores, soft-cap, causal/window mask)."""
    del max_seqlen
    return reference_varlen_attention(q, k, v, cu_seqlens, scale, sliding_window, softcap)
