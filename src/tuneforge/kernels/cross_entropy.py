"""Fused lm_head + cross-entropy: the loss from hidden states without ever holding all logits.

With a 128k-256k vocabulary the [tokens x vocab] logits are the largest tensor of a training
step (8k tokens x 256k x 4 bytes = 8 GiB in fp32). Here tokens are processed in chunks whose
logits fit a fixed byte budget. For each chunk:

1. `logits = h @ W^T (+ bias)` with cuBLAS, in the hidden states' dtype;
2. one Triton kernel reads each row twice (online logsumexp, then softmax) and overwrites the
   logits IN PLACE with d(loss)/d(logits), already divided by the loss denominator and passed
   through the scaling / soft-capping chain rule;
3. the chunk's grad_hidden = dlogits @ W and grad_weight += dlogits^T @ h are taken at once.

So the forward pass does the whole backward's work and the chunk buffer is reused; the autograd
Function's backward only multiplies the stored gradients by the incoming grad_output.

Reduction follows transformers' `ForCausalLMLoss`: the mean over counted (label != ignore_index)
tokens, or the sum divided by `num_items_in_batch` when given (gradient accumulation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tuneforge.kernels._utils import autocast_dtype, check_device, needs_bf16_rounding, round_bf16_rtne
from tuneforge.device import is_capturing
from tuneforge.kernels.launcher import launch

__all__ = [
    "LinearCrossEntropyFunction",
    "fused_linear_cross_entropy",
    "reference_linear_cross_entropy",
]

# Bytes of one chunk's logits: large enough that cuBLAS runs at full speed on H100, small next to
# the model; on the CPU (interpreter, tests) a small budget keeps memory and latency low.
_CHUNK_BYTES_CUDA = 256 * 2**20
_CHUNK_BYTES_CPU = 16 * 2**20


@triton.jit
def _transform(x, scale, softcap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """logits -> the values the softmax sees: optional x * scale, then cap * tanh(x / cap)."""
    if HAS_SCALE:
        x = x * scale
    if HAS_SOFTCAP:
        # tanh from exp (portable to every Triton backend, interpreter included); saturates to
        # +-1 without NaN because 2 / (inf + 1) = 0.
        x = softcap * (1.0 - 2.0 / (tl.exp(2.0 * (x / softcap)) + 1.0))
    return x


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr,  # [n_rows, V] in: logits; out (WRITE_GRAD): d(loss)/d(logits)
    stride_row,
    labels_ptr,  # [n_rows] int64
    loss_ptr,  # [n_rows] fp32 out: lse - z[label], 0 for ignored rows
    inv_denom_ptr,  # [1] fp32: 1 / loss denominator
    n_rows,
    V,
    ignore_index,
    scale,
    softcap,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    # BLOCK_M rows per program: 1 on a GPU (a row's V values are already plenty of parallel
    # work); many on the interpreter, where each program costs Python overhead.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    counted = row_ok & (labels != ignore_index)
    row_ptr = logits_ptr + rows.to(tl.int64)[:, None] * stride_row

    # Pass 1: online logsumexp over the row (fp32), plus the target's value.
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        x = tl.load(row_ptr + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        z = _transform(x.to(tl.float32), scale, softcap, HAS_SCALE, HAS_SOFTCAP)
        # Mask after the transform (soft-capping -inf would give a finite -cap); dead rows read
        # zeros so their running max stays finite and no NaN is ever formed.
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(s)

    target = tl.where(counted, labels, 0)
    xt = tl.load(row_ptr + target[:, None], mask=counted[:, None], other=0.0)
    zt = tl.sum(_transform(xt.to(tl.float32), scale, softcap, HAS_SCALE, HAS_SOFTCAP), axis=1)
    tl.store(loss_ptr + rows, tl.where(counted, lse - zt, 0.0), mask=row_ok)

    if WRITE_GRAD:
        # Pass 2: d(loss)/dz = (softmax - onehot) / denominator, then the chain rule back to the
        # raw logits; ignored rows get exact zeros (their coefficient is 0).
        coef = tl.where(counted, tl.load(inv_denom_ptr), 0.0)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = row_ok[:, None] & (cols < V)[None, :]
            x = tl.load(row_ptr + cols[None, :], mask=mask, other=0.0)
            z = _transform(x.to(tl.float32), scale, softcap, HAS_SCALE, HAS_SOFTCAP)
            p = tl.exp(z - lse[:, None])
            g = tl.where(cols[None, :] == labels[:, None], p - 1.0, p) * coef[:, None]
            if HAS_SOFTCAP:
                t = z / softcap  # = tanh(.), so d z / d(pre-cap) = 1 - t^2
                g = g * (1.0 - t * t)
            if HAS_SCALE:
                g = g * scale
            g = round_bf16_rtne(g, ROUND_BF16).to(logits_ptr.dtype.element_ty)
            tl.store(row_ptr + cols[None, :], g, mask=mask)


def _launch_rows_kernel(logits, labels, loss_rows, inv_denom, ignore_index, scale, softcap, write_grad):
    n_rows, vocab = logits.shape
    if logits.device.type == "cuda":
        block_m, block_v, extra = 1, min(4096, triton.next_power_of_2(vocab)), {"num_warps": 8}
    else:
        block_m, block_v, extra = 16, min(4096, triton.next_power_of_2(vocab)), {}
    grid = (triton.cdiv(n_rows, block_m),)
    launch(_cross_entropy_rows_kernel, grid,
        logits, logits.stride(0), labels, loss_rows, inv_denom,
        n_rows, vocab, ignore_index,
        1.0 if scale is None else float(scale),
        1.0 if softcap is None else float(softcap),
        HAS_SCALE=scale is not None, HAS_SOFTCAP=softcap is not None, WRITE_GRAD=write_grad,
        BLOCK_M=block_m, BLOCK_V=block_v, ROUND_BF16=needs_bf16_rounding(logits.dtype), **extra,
    )


def _chunk_rows(vocab: int, element_size: int, device: torch.device) -> int:
    budget = _CHUNK_BYTES_CUDA if device.type == "cuda" else _CHUNK_BYTES_CPU
    return max(1, budget // (vocab * element_size))


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Loss and all its gradients in one chunked forward pass; backward only rescales.

    forward(hidden [N, H], weight [V, H], bias [V] | None, labels [N] int64,
            inv_denom [1] fp32, ignore_index, scale, softcap, chunk_rows, grad_hidden: bool,
            grad_weight: bool, grad_bias: bool) -> loss [] fp32
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, inv_denom, ignore_index, scale, softcap,
                chunk_rows, want_gh, want_gw, want_gb):
        n_tokens = hidden.shape[0]
        write_grad = want_gh or want_gw or want_gb
        loss_rows = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
        gh = torch.empty_like(hidden) if want_gh else None
        # grad_weight accumulates over chunks in the weight's dtype with addmm_ (cuBLAS keeps the
        # fp32 accumulator inside each product); a separate fp32 copy would cost another [V, H].
        gw = torch.zeros_like(weight) if want_gw else None
        gb = torch.zeros(weight.shape[0], dtype=torch.float32, device=hidden.device) if want_gb else None
        for start in range(0, n_tokens, chunk_rows):
            end = min(start + chunk_rows, n_tokens)
            h = hidden[start:end]
            logits = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())
            _launch_rows_kernel(logits, labels[start:end], loss_rows[start:end], inv_denom,
                                ignore_index, scale, softcap, write_grad)
            # `logits` now holds d(loss)/d(logits) for the chunk.
            if want_gh:
                torch.mm(logits, weight, out=gh[start:end])
            if want_gw:
                gw.addmm_(logits.t(), h)
            if want_gb:
                gb += logits.sum(0, dtype=torch.float32)
            # Free this chunk before the next matmul allocates its own: two live chunk buffers
            # would double the peak.
            del logits
        loss = loss_rows.sum() * inv_denom[0]
        if gb is not None:
            gb = gb.to(bias.dtype)
        ctx.save_for_backward(*(t for t in (gh, gw, gb) if t is not None))
        ctx.present = (gh is not None, gw is not None, gb is not None)
        ctx.backward_done = False
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.backward_done:
            raise RuntimeError(
                "fused_linear_cross_entropy scales its stored gradients in place, so its graph can "
                "be back-propagated once only (no retain_graph=True)"
            )
        ctx.backward_done = True
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) if present else None for present in ctx.present]
        # Always scaled (x * 1.0 is exact): testing grad_output == 1 first would read it back to
        # the host, a synchronisation that stalls the launch-bound step once per backward.
        for g in grads:
            if g is not None:
                g.mul_(grad_output.to(g.dtype))
        gh, gw, gb = grads
        return gh, gw, gb, None, None, None, None, None, None, None, None, None


def _prepare(hidden, weight, labels, ignore_index, shift, bias):
    """Validated, flattened inputs: hidden [N, H], labels [N]."""
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dimension ({hidden.shape[-1]}) must equal lm_head_weight's "
            f"in-features (weight shape {tuple(weight.shape)} = [vocab, hidden])"
        )
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(
            f"hidden ({hidden.dtype}), lm_head_weight ({weight.dtype}) and lm_head_bias must share "
            "a dtype; cast hidden to the lm_head's dtype first"
        )
    if shift:
        if labels.shape != hidden.shape[:-1]:
            raise ValueError(
                f"with shift=True labels must have hidden's leading shape {tuple(hidden.shape[:-1])} "
                f"(unshifted [batch, seq]); got {tuple(labels.shape)}"
            )
        # As transformers' ForCausalLMLoss: pad with ignore_index, then shift left by one, so
        # the last position of every sequence predicts nothing.
        labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"labels hold {labels.shape[0]} tokens but hidden holds {hidden.shape[0]}; pass "
            "already-shifted labels of hidden's leading shape, or shift=True with unshifted ones"
        )
    return hidden, labels.to(device=hidden.device, dtype=torch.int64)


def check_labels(labels: torch.Tensor, vocab: int, ignore_index: int = -100) -> None:
    """Raise if a label is neither ignore_index nor in [0, vocab) (one host sync)."""
    counted = labels[labels != ignore_index]
    if ((counted < 0) | (counted >= vocab)).any():
        raise ValueError(
            f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; got values in "
            f"[{int(counted.min())}, {int(counted.max())}]"
        )


def _denominator(labels, ignore_index, num_items_in_batch) -> torch.Tensor:
    """The loss denominator as a fp32 tensor on labels' device (no host sync)."""
    if num_items_in_batch is None:
        return (labels != ignore_index).sum().to(torch.float32).reshape(1)
    if torch.is_tensor(num_items_in_batch):
        return num_items_in_batch.detach().to(device=labels.device, dtype=torch.float32).reshape(1)
    return torch.tensor([float(num_items_in_batch)], dtype=torch.float32, device=labels.device)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    logit_softcap: float | None = None,
    logit_scale: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    shift: bool = False,
    lm_head_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal-LM loss of `hidden @ lm_head_weight^T` without materialising all logits.

    hidden:         [tokens, H] or [batch, seq, H] (flattened inside).
    lm_head_weight: [V, H], same dtype as hidden; may be frozen (then no grad_weight is formed).
    labels:         [tokens] (already aligned with hidden), or with shift=True unshifted labels of
                    hidden's leading shape ([batch, seq]) shifted here exactly as transformers'
                    ForCausalLMLoss does.
    logit_scale:    logits are MULTIPLIED by it before soft-capping and softmax (Cohere's
                    `logit_scale`). Granite DIVIDES by `config.logits_scaling`: pass
                    logit_scale=1 / logits_scaling.
    logit_softcap:  cap * tanh(logits / cap) (Gemma 2's `final_logit_softcapping`).
    num_items_in_batch: when given, loss = sum / num_items_in_batch (gradient accumulation);
                    otherwise the mean over tokens whose label is not ignore_index (NaN when there
                    are none, as torch's cross_entropy).
    chunk_size:     tokens per chunk; default: as many as keep one chunk's logits under 256 MiB on
                    a GPU (16 MiB on a CPU).
    lm_head_bias:   [V] or None.
    Returns the loss, a fp32 scalar. Labels outside [0, V) other than ignore_index raise.
    Under torch.autocast, hidden, weight and bias are cast to the autocast dtype first (as the
    lm_head's F.linear would be).
    """
    cast = autocast_dtype(hidden.device)
    if cast is not None:
        with torch.autocast(hidden.device.type, enabled=False):
            return fused_linear_cross_entropy(
                hidden.to(cast), lm_head_weight.to(cast), labels, ignore_index=ignore_index,
                logit_softcap=logit_softcap, logit_scale=logit_scale, num_items_in_batch=num_items_in_batch,
                chunk_size=chunk_size, shift=shift, lm_head_bias=None if lm_head_bias is None else lm_head_bias.to(cast),
            )
    hidden, labels = _prepare(hidden, lm_head_weight, labels, ignore_index, shift, lm_head_bias)
    check_device(hidden, lm_head_weight)
    vocab = lm_head_weight.shape[0]
    # One host sync per call: an out-of-range label would otherwise read outside the logits row.
    # Under CUDA-graph capture a sync is illegal: the graphed step checks each batch before replay.
    if not is_capturing(labels.device):
        check_labels(labels, vocab, ignore_index)
    if logit_softcap is not None and logit_softcap <= 0:
        raise ValueError(f"logit_softcap must be positive, got {logit_softcap}")
    if chunk_size is None:
        chunk_size = _chunk_rows(vocab, hidden.element_size(), hidden.device)
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    inv_denom = 1.0 / _denominator(labels, ignore_index, num_items_in_batch)
    grad_on = torch.is_grad_enabled()
    bias_grad = lm_head_bias is not None and lm_head_bias.requires_grad
    return LinearCrossEntropyFunction.apply(
        hidden, lm_head_weight, lm_head_bias, labels, inv_denom, ignore_index,
        logit_scale, logit_softcap, chunk_size,
        grad_on and hidden.requires_grad, grad_on and lm_head_weight.requires_grad, grad_on and bias_grad,
    )


def reference_linear_cross_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    logit_softcap: float | None = None,
    logit_scale: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    shift: bool = False,
    lm_head_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same loss in plain PyTorch: full logits in fp32, then F.cross_entropy.

    Shapes and semantics as `fused_linear_cross_entropy` (no chunk_size: nothing is chunked).
    """
    hidden, labels = _prepare(hidden, lm_head_weight, labels, ignore_index, shift, lm_head_bias)
    logits = F.linear(hidden, lm_head_weight, lm_head_bias).float()
    if logit_scale is not None:
        logits = logits * logit_scale
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, labels, ignore_index=ignore_index)
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch
