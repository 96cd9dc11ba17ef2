"""CausalLM.forward -> with labels, the loss from the hidden states by `kernels.cross_entropy`,
chunked, so the [tokens x vocab] logits never exist (logits=None is returned); without labels
(generation) the model's own forward, logits as usual.
"""

from __future__ import annotations

import functools
import logging
import sys
import types
from dataclasses import dataclass

import torch
from torch import nn

from tuneforge.kernels.cross_entropy import fused_linear_cross_entropy
from tuneforge.models.families import FamilySpec
from tuneforge.models.record import record_of
from tuneforge.patch.attention import UNPADDED, AttentionPlan
from tuneforge.patch.modules import LOGGED

logger = logging.getLogger(__name__)


def _logit_transform(model, spec: FamilySpec) -> tuple[float | None, float | None]:
    """(softcap, scale) the family applies to the logits, read from the model's config."""
    config = model.config
    softcap = getattr(config, spec.final_logit_softcap_attr, None) if spec.final_logit_softcap_attr else None
    scale = getattr(config, spec.logit_scale_attr, None) if spec.logit_scale_attr else None
    if scale is not None:
        scale = 1.0 / float(scale) if spec.logit_scale_divides else float(scale)
        if scale == 1.0:
            scale = None
    return (float(softcap) if softcap else None), scale


@dataclass(frozen=True)
class LossPlan:
    """The fused loss of one model, fixed when the model is patched.

    softcap / scale: what the family applies to the logits (Gemma 2/3's final soft-cap; Cohere's and
        Granite's logit scale), None when nothing.
    varlen: the attention runs padding-free batches by the varlen kernel, so the forward hands
        transformers an empty 4-D mask for them (see `_causal_lm_forward`).
    unpadded_hint: the attention runs soft-capped attention by its kernel and receives keyword
        arguments: batches without attention_mask are marked UNPADDED for it.
    """

    softcap: float | None
    scale: float | None
    varlen: bool
    unpadded_hint: bool = False


def _causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                       inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, *, plan: LossPlan,
                       **kwargs):
    """With labels: the loss by the chunked fused cross-entropy, logits=None. Without: the model's own forward.

    input_ids / labels: [B, S] (labels unshifted, -100 ignored, as transformers); `num_items_in_batch`
    (gradient accumulation) makes the loss a sum over that many tokens, as transformers' loss does.
    """
    original = type(self).forward.__get__(self)
    lm_head = self.get_output_embeddings()
    why_not = None if labels is None else _unchunkable_head(lm_head)
    if labels is None or why_not:
        if why_not and why_not not in LOGGED:
            LOGGED.add(why_not)
            logger.warning("chunked loss not used: %s; the loss uses full [tokens x vocab] logits", why_not)
        return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                        use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    if kwargs.get("cu_seq_lens_q") is not None and past_key_values is None and plan.varlen:
        # A padding-free batch: the patched attention reads the sample boundaries from cu_seq_lens
        # (varlen kernel). transformers would otherwise detect the packing from position_ids (a
        # device sync) and build a [T, T] block-diagonal mask that nothing reads (256 MB at 16k
        # tokens); a mask that is already 4-D is passed through untouched, and this one is empty,
        # so any attention that did try to read it would fail loudly rather than compute wrongly.
        device = (input_ids if input_ids is not None else inputs_embeds).device
        attention_mask = torch.empty((1, 1, 0, 0), dtype=torch.bool, device=device)
    elif plan.unpadded_hint and attention_mask is None and past_key_values is None and position_ids is None \
            and kwargs.get("cu_seq_lens_q") is None:
        # Whole causal rows, no padding: soft-capped attention may take them as samples of S tokens.
        # A loss needs no KV cache; one built only because the config says use_cache=True would
        # keep the attention on transformers' path (asking for use_cache=True explicitly still does).
        kwargs[UNPADDED] = True
        if use_cache is None:
            use_cache = False
    ignore_index = kwargs.pop("ignore_index", -100)
    return_dict = kwargs.pop("return_dict", None)  # peft passes None: transformers then returns the dataclass
    if kwargs.get("output_router_logits") is None and getattr(self.config, "output_router_logits", False):
        kwargs["output_router_logits"] = True  # MoE: the config asks for the routers' aux loss
    outputs = getattr(self, self.base_model_prefix)(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
    )
    hidden = outputs[0]
    gathered = _gather_sharded_head(lm_head)
    weight = lm_head.weight
    loss = fused_linear_cross_entropy(
        hidden.to(weight.dtype), weight, labels if shift_labels is None else shift_labels,
        ignore_index=ignore_index, logit_softcap=plan.softcap, logit_scale=plan.scale,
        num_items_in_batch=num_items_in_batch, shift=shift_labels is None, lm_head_bias=lm_head.bias,
    )
    if gathered and not any(p.requires_grad for p in lm_head.parameters()):
        # The loss Function formed every gradient already and its backward never reads the
        # weight: the gathered [vocab, hidden] copy is freed now, not at the end of backward.
        lm_head.reshard()
    if getattr(outputs, "router_logits", None) is not None and kwargs.get("output_router_logits"):
        return _with_router_aux_loss(self, loss, outputs, attention_mask, return_dict)
    result = CausalLMOutputWithPast(
        loss=loss, logits=None, past_key_values=getattr(outputs, "past_key_values", None),
        hidden_states=getattr(outputs, "hidden_states", None), attentions=getattr(outputs, "attentions", None),
    )
    return result.to_tuple() if return_dict is False else result


def _with_router_aux_loss(model, loss, outputs, attention_mask, return_dict):
    """A MoE model's output with its routers' load-balancing loss, as transformers computes it: the
    family's own `load_balancing_loss_func`, added to the loss times `router_aux_loss_coef`."""
    from transformers.modeling_outputs import MoeCausalLMOutputWithPast

    balancing = sys.modules[type(model).__module__].load_balancing_loss_func
    # A padding-free batch's empty 4-D mask (see above) is no token mask: every row counts, as without one.
    mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
    aux_loss = balancing(outputs.router_logits, model.num_experts, model.num_experts_per_tok, mask)
    result = MoeCausalLMOutputWithPast(
        loss=loss + model.router_aux_loss_coef * aux_loss.to(loss.device), aux_loss=aux_loss, logits=None,
        past_key_values=getattr(outputs, "past_key_values", None), router_logits=outputs.router_logits,
        hidden_states=getattr(outputs, "hidden_states", None), attentions=getattr(outputs, "attentions", None),
    )
    return result.to_tuple() if return_dict is False else result


def _is_linear_class(module: nn.Module) -> bool:
    """True for an nn.Linear itself, also once FSDP2's `fully_shard` has swapped the instance's class
    for its dynamic `FSDP<cls>` subclass (bases: FSDPModule, cls). False for subclasses that change
    the matmul (bitsandbytes' 4/8-bit layers): the chunked loss multiplies by `weight` directly."""
    cls = type(module)
    if cls is nn.Linear:
        return True
    bases = cls.__bases__
    return len(bases) == 2 and bases[0].__name__ == "FSDPModule" and bases[1] is nn.Linear


def _unchunkable_head(lm_head: nn.Module) -> str | None:
    """Why the chunked loss cannot multiply by `lm_head.weight` here (None: it can)."""
    if not _is_linear_class(lm_head):
        return f"lm_head is a {type(lm_head).__name__}, not a Linear"
    if hasattr(lm_head.weight, "_local_tensor") and not hasattr(lm_head, "unshard"):
        return "lm_head's weight is a sharded DTensor outside an FSDP2 unit we can gather"
    return None


def _gather_sharded_head(lm_head: nn.Module) -> bool:
    """All-gather an FSDP2-sharded lm_head (True if it was sharded here).

    FSDP2 gathers a unit's weights in its forward pre-hook, and the chunked loss never calls
    lm_head's forward: it multiplies by the weight itself. When lm_head is a unit of its own
    (accelerate makes [final norm, lm_head] one, but finds no final norm among a peft model's
    direct children), its weight is still a DTensor holding 1/N of the rows here, so it is
    gathered explicitly, the public `FSDPModule.unshard()`. Where lm_head shares a unit with a
    module that did run (the final norm, tied input embeddings), the weight is already whole.
    """
    if not hasattr(lm_head.weight, "_local_tensor"):  # a plain tensor: no FSDP, or already gathered
        return False
    lm_head.unshard()
    return True


def patch_loss(model, spec: FamilySpec) -> str | None:
    if not isinstance(model.get_output_embeddings(), nn.Linear):
        logger.info("loss not patched: the output layer is not a Linear")
        return None
    record = record_of(model)
    varlen = any(isinstance(plan, AttentionPlan) and plan.varlen for plan in record.plans.values())
    hint = any(isinstance(plan, AttentionPlan) and plan.varlen and plan.softcap_kernel for plan in record.plans.values())
    plan = LossPlan(*_logit_transform(model, spec), varlen=varlen, unpadded_hint=hint)
    model.forward = types.MethodType(functools.partial(_causal_lm_forward, plan=plan), model)
    record.plans[""] = plan  # "": the model itself
    return "fused_cross_entropy"
