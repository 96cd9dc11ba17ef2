"""self_attn -> one Llama-shaped attention forward that rotates q and k with `kernels.rope`.

The family's variations (how q/k/v are projected, q/k norms, soft-capping, whether padding-free
batches run the varlen kernel) are an `AttentionPlan` bound into the forward when the model is
patched; `lora.fused.patch_lora` rebinds the plan with the fused LoRA projection. Nothing is read
from the module at run time to choose a path.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.kernels import rope  # module attribute: tests spy on rope.apply_rope
from tuneforge.kernels.softcap_attention import dense_softcap_attention, softcap_attention, softcap_supported
from tuneforge.kernels.varlen_attention import varlen_attention
from tuneforge.models.families import FamilySpec
from tuneforge.models.record import record_of
from tuneforge.patch.modules import LOGGED, decoder_modules
from tuneforge.switches import SOFTCAP_KERNEL_ENV, VARLEN_ENV

logger = logging.getLogger(__name__)


def _attention_fits(attn: nn.Module, spec: FamilySpec) -> str | None:
    """None when `_attention_forward` computes exactly what `attn` does, else why not."""
    projections = ("q_proj", "k_proj", "v_proj") if spec.qkv == "separate" else ("qkv_proj",)
    for name in (*projections, "o_proj"):
        if not hasattr(attn, name):
            return f"{type(attn).__name__} has no {name}"
    for name in ("head_dim", "scaling", "layer_idx", "config"):
        if not hasattr(attn, name):
            return f"{type(attn).__name__} has no attribute {name}"
    if spec.qk_norm is not None and not (hasattr(attn, "q_norm") and hasattr(attn, "k_norm")):
        return f"{type(attn).__name__} has no q_norm / k_norm"
    # Optional q/k norms the layout does not describe (StableLM qk_layernorm, Cohere use_qk_norm).
    if spec.qk_norm is None and (getattr(attn, "qk_layernorm", False) or getattr(attn, "use_qk_norm", False)):
        return f"{type(attn).__name__} normalises q and k (qk_layernorm / use_qk_norm)"
    if getattr(attn, "clip_qkv", None):
        return f"{type(attn).__name__} clips q/k/v (clip_qkv)"
    return None


def _attention_interface(attn: nn.Module):
    """The attention kernel transformers would pick for `attn` (eager from the family's own module)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = sys.modules[type(attn).__module__].eager_attention_forward
    implementation = attn.config._attn_implementation
    if implementation in (None, "eager"):
        return eager
    get_interface = getattr(ALL_ATTENTION_FUNCTIONS, "get_interface", None)
    return get_interface(implementation, eager) if get_interface else ALL_ATTENTION_FUNCTIONS[implementation]


def _rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int):
    """Rotate-half RoPE of q [B, S, Hq * D] and k [B, S, Hk * D] (or [B, S, H, D]) by the kernel.

    In place when autograd allows it: the projections' outputs are fresh tensors that nothing
    saves for its backward (Linear and peft's LoRA keep their inputs, the q/k norms theirs), so
    overwriting them costs no copy. Views of another tensor that require grad cannot be
    modified in place by a two-output Function (Phi-3's packed qkv_proj split, fused-LoRA QKV
    outputs viewed inside their Function): those are rotated out of place, logged once.
    cos/sin: [B or 1, S, R]; with R < D (partial rotary: StableLM, Phi-4-mini) only the leading
    R dims of each head turn and the rest pass through, as transformers does.
    """
    views = [name for name, t in (("q", q), ("k", k)) if t._base is not None and t.requires_grad]
    inplace = not (views and torch.is_grad_enabled())
    if not inplace and "rope_views" not in LOGGED:
        LOGGED.add("rope_views")
        logger.info("RoPE out of place: %s arrive as views of another tensor, which autograd does not let a "
                    "two-output Function modify in place", " and ".join(views))
    return rope.apply_rope(q, k, cos, sin, head_dim, inplace=inplace)


def separate_qkv(attn: nn.Module, hidden_states: torch.Tensor):
    """q [..., Hq*D], k and v [..., Hk*D] from three projections (Llama, Qwen, Gemma, ...)."""
    return attn.q_proj(hidden_states), attn.k_proj(hidden_states), attn.v_proj(hidden_states)


def packed_qkv(attn: nn.Module, hidden_states: torch.Tensor):
    """Phi-3: one qkv_proj whose output is [q | k | v]."""
    qkv = attn.qkv_proj(hidden_states)
    q_size = attn.config.num_attention_heads * attn.head_dim
    kv_size = attn.config.num_key_value_heads * attn.head_dim
    return qkv.split((q_size, kv_size, kv_size), dim=-1)


@dataclass(frozen=True)
class AttentionPlan:
    """What one patched attention module computes, fixed when the model is patched.

    project: (attn, hidden_states [B, S, H]) -> (q, k, v); `separate_qkv` / `packed_qkv`, or the
        fused LoRA Function that `lora.fused.patch_lora` puts here.
    qk_norm: None, "full" (OLMo 2: over all heads, before the reshape) or "head" (Qwen3, Gemma 3).
    softcap: Gemma 2's attention logit soft-cap (the module's attn_logit_softcapping).
    varlen: padding-free batches (cu_seq_lens) run `kernels.varlen_attention` per sample.
    softcap_kernel: soft-capped attention runs `kernels.softcap_attention` (flash, Triton) on
        padding-free batches and on batches the causal-LM forward marks unpadded (UNPADDED), instead
        of the per-sample reference and transformers' eager attention.
    """

    project: Callable
    qk_norm: str | None
    softcap: bool
    varlen: bool = False
    softcap_kernel: bool = False


# Keyword argument the patched causal-LM forward passes down (through the decoder layers' **kwargs)
# when its batch has no attention_mask, no cache and no sample boundaries: every row is one whole
# causal sequence, so the soft-cap kernel may take it as cu_seqlens = 0, S, 2S, ...
UNPADDED = "tuneforge_unpadded"


def bind(model, name: str, attn: nn.Module, plan: AttentionPlan) -> None:
    """Make `plan` the forward of `attn` (the module `name` of `model`), recorded in model.tuneforge.plans."""
    attn.forward = types.MethodType(functools.partial(_attention_forward, plan=plan), attn)
    record_of(model).plans[name] = plan


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                       past_key_values=None, *, plan: AttentionPlan, **kwargs):
    """Llama-shaped attention with the RoPE kernel; hidden_states: [B, S, H] -> ([B, S, H], weights).

    The steps and their order are transformers' (Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3,
    Granite, OLMo 2, StableLM, StarCoder2); `plan` carries the family's variations, the sliding
    window comes from the module or its config as there.
    """
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q, k, v = plan.project(self, hidden_states)
    qk_norm = plan.qk_norm
    if qk_norm == "full":  # OLMo 2: over all heads at once, before the reshape
        q, k = self.q_norm(q), self.k_norm(k)
    elif qk_norm == "head":  # Qwen3, Gemma 3: over head_dim (same result before or after the transpose)
        q, k = self.q_norm(q.view(hidden_shape)), self.k_norm(k.view(hidden_shape))
    # RoPE before the per-head view and transpose (it acts per token and head, so the order does
    # not change the result): the kernel then rotates the projection / norm outputs in place.
    cos, sin = position_embeddings
    q, k = _rotate(q, k, cos, sin, self.head_dim)
    q, k, v = q.view(hidden_shape), k.view(hidden_shape), v.view(hidden_shape)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, self.layer_idx)

    extra = {}
    if plan.softcap:
        extra["softcap"] = self.attn_logit_softcapping
    sliding = self.sliding_window if hasattr(self, "sliding_window") else getattr(self.config, "sliding_window", None)
    if sliding is not None:
        extra["sliding_window"] = sliding
    dropout = getattr(self, "attention_dropout", 0.0) if self.training else 0.0
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    unpadded = kwargs.pop(UNPADDED, False)
    # The soft-cap kernel has no attention dropout: with dropout the paths below (reference, eager) run.
    if plan.softcap_kernel and cu_seqlens is not None and plan.varlen and past_key_values is None \
            and input_shape[0] == 1 and not dropout:
        out = softcap_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu_seqlens,
                                kwargs["max_length_q"], self.scaling, extra["softcap"], extra.get("sliding_window"))
        out, weights = out.unsqueeze(0), None
    elif plan.softcap_kernel and unpadded and cu_seqlens is None and past_key_values is None and not dropout:
        out = dense_softcap_attention(q, k, v, self.scaling, extra["softcap"], extra.get("sliding_window"))
        weights = None
    elif cu_seqlens is not None and plan.varlen and past_key_values is None and input_shape[0] == 1:
        # A padding-free batch (one row of samples end to end, boundaries in cu_seqlens): per-sample
        # attention by the varlen kernel instead of a [T, T] block-diagonal mask (kernels/varlen_attention.py).
        out = varlen_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu_seqlens,
                               kwargs["max_length_q"], self.scaling, sliding_window=extra.get("sliding_window"),
                               softcap=extra.get("softcap"), dropout=dropout)
        out, weights = out.unsqueeze(0), None
    else:
        out, weights = _attention_interface(self)(
            self, q, k, v, attention_mask, dropout=dropout, scaling=self.scaling, **extra, **kwargs,
        )
    out = self.o_proj(out.reshape(*input_shape, -1).contiguous())
    residual_dropout = getattr(self, "residual_dropout", 0.0)  # StarCoder2
    if residual_dropout:
        out = F.dropout(out, p=residual_dropout, training=self.training)
    return out, weights


def patch_attention(model, spec: FamilySpec) -> str | None:
    if spec.attention != "rope":
        logger.info("family %s keeps transformers' attention (its RoPE or layout does not fit the kernel)", spec.name)
        return None
    modules = decoder_modules(model, "self_attn")
    reasons = [reason for _, attn in modules if (reason := _attention_fits(attn, spec))]
    if not modules or reasons:
        logger.info("attention not patched: %s", reasons[0] if reasons else "no self_attn modules found")
        return None
    project = separate_qkv if spec.qkv == "separate" else packed_qkv
    kernel = None
    for name, attn in modules:
        softcap = spec.attn_softcap and getattr(attn, "attn_logit_softcapping", None) is not None
        if softcap and kernel is None:
            kernel = _softcap_kernel_fits(model, attn)
        # patch_varlen decides varlen
        bind(model, name, attn, AttentionPlan(project, spec.qk_norm, softcap, softcap_kernel=softcap and kernel))
    return "rope"


def _softcap_kernel_fits(model, attn: nn.Module) -> bool:
    """Whether soft-capped attention can run kernels.softcap_attention on this model's device and
    shapes (built and checked against the reference once here, by softcap_supported); logged either way."""
    if not record_of(model).switches.softcap_kernel:
        logger.info("%s=0: soft-capped attention stays on transformers' eager path", SOFTCAP_KERNEL_ENV)
        return False
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    weight = next(p for p in attn.parameters())
    dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16
    why = softcap_supported(attn.head_dim, heads, kv_heads, dtype, weight.device)
    if why:
        logger.info("soft-capped attention stays on transformers' eager path: %s", why)
        return False
    logger.info("soft-capped attention: flash kernel (kernels/softcap_attention.py)")
    return True


def patch_varlen(model, spec: FamilySpec) -> str | None:
    """"varlen" when padding-free batches can run the varlen kernel: the attention is ours and every
    decoder layer hands its keyword arguments (cu_seq_lens_q, max_length_q) on to it.

    Read from the decoder layer's source once, here: some families' layers call self_attn with
    a fixed argument list (StableLM in transformers 5), and the boundaries would never arrive.
    Without "varlen", padding-free batches keep transformers' block-diagonal mask (correct, slower).
    """
    import inspect
    import re

    record = record_of(model)
    if not record.switches.varlen:
        logger.info("%s=0: padding-free batches use transformers' block-diagonal mask", VARLEN_ENV)
        return None
    attentions = decoder_modules(model, "self_attn")
    if not attentions or any(not isinstance(record.plans.get(name), AttentionPlan) for name, _ in attentions):
        return None
    layers = {type(module) for module in model.modules() if isinstance(getattr(module, "self_attn", None), nn.Module)}
    for layer in layers:
        try:
            source = inspect.getsource(layer.forward)
        except (OSError, TypeError):
            return None
        call = re.search(r"self\.self_attn\((.*?)\n\s*\)", source, re.DOTALL)
        if call is None or "**kwargs" not in call.group(1):
            logger.info("%s does not pass keyword arguments to its attention: padding-free batches use "
                        "transformers' block-diagonal mask instead of the varlen kernel", layer.__name__)
            return None
    for name, attn in attentions:
        bind(model, name, attn, dataclasses.replace(record.plans[name], varlen=True))
    return "varlen"
