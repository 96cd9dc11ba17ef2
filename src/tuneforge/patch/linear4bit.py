"""A bitsandbytes Linear4bit's forward for decode steps: the few rows multiplied by `kernels.nf4_gemv`.

`linear4bit_forward` is bound to every Linear4bit by `patch._patch_linear4bit`; `decode_matmul`
(the choice between our NF4 matmul and bitsandbytes' own) also serves the fused LoRA decode path
(`lora.projections`).
"""

from __future__ import annotations

import logging

import torch

from tuneforge.integration.bnb import linear4bit_forward as bitsandbytes_forward
from tuneforge.kernels import nf4_gemv
from tuneforge.switches import NF4_GEMV_ENV

logger = logging.getLogger(__name__)

__all__ = ["decode_matmul", "linear4bit_forward"]

# Measured on an H100 (bench/kernels.py --only nf4_matmul, 2026-11-23): with its current launch
# choice nf4_matmul took 0.10-0.57 ms where bitsandbytes' matmul_4bit took 0.011-0.13 ms at 1 and 8
# rows of the Llama-3.1-8B shapes (0.10x-0.85x). Until a tuned launch beats it, decode steps on CUDA
# multiply through bitsandbytes (its fused 4-bit GEMV for a single row); TUNEFORGE_NF4_GEMV=1
# (switches.nf4_gemv) selects ours, as do CPU runs (bitsandbytes has no fused kernel there).
_said_which: set = set()


def decode_matmul(x: torch.Tensor, weight_packed: torch.Tensor, quant_state, bias: torch.Tensor | None = None,
                  *, nf4_gemv_on_cuda: bool):
    """x [..., K] (at most nf4_gemv.MAX_ROWS rows, no autograd) @ dequant(W)^T (+ bias) -> a fresh
    [..., N] in x's dtype, by the faster of nf4_matmul and bitsandbytes' matmul_4bit for the device.

    nf4_gemv_on_cuda: the nf4_gemv switch (ours on CUDA too).
    """
    ours = not x.is_cuda or nf4_gemv_on_cuda
    if x.device.type not in _said_which:
        _said_which.add(x.device.type)
        logger.info("decode matmuls on %s: %s", x.device.type, "nf4_matmul" if ours else
                    f"bitsandbytes matmul_4bit (nf4_matmul measured slower on the H100; {NF4_GEMV_ENV}=1 selects it)")
    if ours:
        return nf4_gemv.nf4_matmul(x, weight_packed, quant_state, bias)
    import bitsandbytes as bnb

    # bitsandbytes wants the bias in x's dtype (ours adds it in fp32); Linear4bit does the same cast.
    return bnb.matmul_4bit(x, weight_packed.t(), quant_state=quant_state,
                           bias=None if bias is None else bias.to(x.dtype))


def linear4bit_forward(self, x: torch.Tensor, *, nf4_gemv_on_cuda: bool = False) -> torch.Tensor:
    """Forward of a bitsandbytes Linear4bit, bound to the instance by `patch._patch_linear4bit`.

    x: [..., in] -> [..., out] in x's dtype. A decode step (at most nf4_gemv.MAX_ROWS rows, no
    gradient wanted, a weight nf4_matmul reads) multiplies by `decode_matmul` in the layer's compute
    dtype, as bitsandbytes does; anything else runs bitsandbytes' forward (`integration.bnb`).
    nf4_gemv_on_cuda: the model's `switches.nf4_gemv`, bound in when the layer is patched.
    """
    weight, bias = self.weight, self.bias
    # Under FSDP the gathered weight loses its state; bitsandbytes keeps it on the module.
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        quant_state = getattr(self, "quant_state", None)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    wants_grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
    # bitsandbytes settles compute_dtype on a layer's first call (and warns about fp16 there): let it.
    if (0 < rows <= nf4_gemv.MAX_ROWS and not wants_grad and self.compute_type_is_set and x.device == weight.device
            and nf4_gemv.nf4_matmul_unsupported(quant_state, x.shape[-1]) is None):
        compute = self.compute_dtype or x.dtype
        return decode_matmul(x.to(compute), weight, quant_state, bias,
                             nf4_gemv_on_cuda=nf4_gemv_on_cuda).to(x.dtype)
    return bitsandbytes_forward(self, x)
