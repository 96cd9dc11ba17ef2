"""Swap a loaded model's forwards for kernel-backed ones, family by family.

What is patched follows the family table (`FamilySpec` layout fields), never the family name:

  norm modules      -> `kernels.rms_norm` (Llama, OLMo 2 and Gemma rounding) or `kernels.layer_norm`
  self_attn         -> one Llama-shaped attention forward (`_attention_forward`) that rotates q and k
                       with `kernels.rope` (and, after `lora.fused.patch_lora`, projects Q/K/V
                       with one fused LoRA Function)
  mlp               -> act(gate) * up by `kernels.swiglu` / `kernels.geglu` (and, after patch_lora,
                       the whole block as one fused LoRA Function)
  CausalLM.forward  -> with labels: the loss from hidden states by `kernels.cross_entropy`, chunked,
                       so the [tokens x vocab] logits never exist (logits=None is returned); without
                       labels (generation) the model's own forward, logits as usual.
  bnb Linear4bit    -> decode steps (<= 8 rows, no gradient) by `kernels.nf4_gemv`, the packed weight
                       read once; anything else bitsandbytes' own forward.

Every patch is an attribute on the module INSTANCE (`module.forward = ...`), never on a class or
a modeling module's global: a model built later in the same process, or the unpatched twin a test
compares against, runs transformers' code untouched.

One switch turns every patch off so users can compare and bisect: `use_kernels=False` in
`from_pretrained`, or the environment variable TUNEFORGE_DISABLE_KERNELS=1.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import types

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.kernels.varlen_attention import varlen_attention
from tuneforge.models.families import FamilySpec
from tuneforge.models.record import record_of
from tuneforge.switches import KERNELS_ENV, TRITON_INTERPRETER, VARLEN_ENV

logger = logging.getLogger(__name__)

# Per-call conditions that are logged once per process rather than at every layer and step.
_LOGGED: set[str] = set()


def kernels_can_run(model) -> str | None:
    """None when Triton kernels can run on `model`'s device, else the reason they cannot."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return "the model has no parameters"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and TRITON_INTERPRETER:
        return None
    return f"Triton kernels need a CUDA device (the model is on {device}; on CPU set TRITON_INTERPRET=1 before importing triton)"


def patch_model(model, spec: FamilySpec | None = None, enabled: bool | None = None) -> list[str]:
    """Patch `model` in place; returns the names of the patches applied (empty: plain path).

    spec / enabled: the family and kernel switch of `model.tuneforge` (the loader's record) unless
    given. The names are also stored in `model.tuneforge.kernels` ("rms_norm" / "layer_norm", "rope",
    "varlen", "swiglu" / "geglu", "fused_cross_entropy", "nf4_gemv"); the trainer reads
    "fused_cross_entropy" and "varlen" there.
    """
    record = record_of(model)
    if spec is None:
        spec = record.family
    else:
        record.family = spec
    if enabled is not None and enabled != record.switches.kernels:
        record.switches = dataclasses.replace(record.switches, kernels=enabled)
    record.kernels = []
    if not record.switches.kernels:
        logger.info("kernels off (%s or use_kernels=False): plain transformers path", KERNELS_ENV)
        return []
    if spec is None or not spec.kernels:
        name = spec.name if spec else model.config.model_type
        logger.info("family %s has no proven kernel patches yet: plain transformers path", name)
        return []
    why_not = kernels_can_run(model)
    if why_not:
        logger.info("kernels off: %s; plain transformers path", why_not)
        return []
    applied: list[str] = []
    for patcher in (_patch_norms, _patch_attention, _patch_varlen, _patch_mlp, _patch_loss, _patch_linear4bit):
        name = patcher(model, spec)
        if name:
            applied.append(name)
    record.kernels = applied
    logger.info("kernels for family %s: %s", spec.name, ", ".join(applied) or "none fit this model")
    return applied


def _decoder_modules(model, suffix: str):
    """(name, module) for every module whose qualified name ends with `.suffix`."""
    return [(name, module) for name, module in model.named_modules() if name.endswith("." + suffix)]


# --- norms -----------------------------------------------------------------------------------------


def _norm_kind(module: nn.Module, spec: FamilySpec) -> str | None:
    """"rms" / "layer" when `module` is a norm the kernels compute for this family, else None."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None  # e.g. Cohere's optional per-head q/k LayerNorm with a [heads, head_dim] weight
    name = type(module).__name__
    if spec.norm == "layer":
        if isinstance(module, nn.LayerNorm):
            return "layer" if len(module.normalized_shape) == 1 else None
        # Cohere's LayerNorm: no bias, fp32 inside, rounded once: what the kernel does.
        return "layer" if name.endswith("LayerNorm") and getattr(module, "bias", None) is None else None
    return "rms" if name.endswith("RMSNorm") else None


def _norm_eps(module: nn.Module) -> float:
    eps = getattr(module, "variance_epsilon", None)
    return float(module.eps if eps is None else eps)


def _rms_norm_forward(self, hidden_states):
    from tuneforge.kernels.rms_norm import rms_norm

    offset, cast_before = self._tuneforge_rms
    return rms_norm(hidden_states, self.weight, _norm_eps(self), offset, cast_before)


def _layer_norm_forward(self, hidden_states):
    from tuneforge.kernels.layer_norm import layer_norm

    return layer_norm(hidden_states, self.weight, getattr(self, "bias", None), _norm_eps(self))


def _patch_norms(model, spec: FamilySpec) -> str | None:
    count = 0
    for module in model.modules():
        kind = _norm_kind(module, spec)
        if kind == "rms":
            # Llama rounds x_hat to the input dtype before the weight; Gemma and OLMo 2 multiply in fp32.
            module._tuneforge_rms = (1.0 if spec.norm == "rms_offset" else 0.0, spec.norm == "rms")
            module.forward = types.MethodType(_rms_norm_forward, module)
            count += 1
        elif kind == "layer":
            module.forward = types.MethodType(_layer_norm_forward, module)
            count += 1
    if not count:
        logger.info("no %s norm modules found in %s: norms not patched", spec.norm, type(model).__name__)
        return None
    return "layer_norm" if spec.norm == "layer" else "rms_norm"


# --- attention -------------------------------------------------------------------------------------


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
    from tuneforge.kernels.rope import apply_rope

    views = [name for name, t in (("q", q), ("k", k)) if t._base is not None and t.requires_grad]
    inplace = not (views and torch.is_grad_enabled())
    if not inplace and "rope_views" not in _LOGGED:
        _LOGGED.add("rope_views")
        logger.info("RoPE out of place: %s arrive as views of another tensor, which autograd does not let a "
                    "two-output Function modify in place", " and ".join(views))
    return apply_rope(q, k, cos, sin, head_dim, inplace=inplace)


def _project_qkv(self, hidden_states):
    """q [..., Hq*D], k and v [..., Hk*D] from the projections (one fused LoRA Function after patch_lora)."""
    if self._tuneforge_qkv == "fused":  # Phi-3: one qkv_proj, split [q | k | v]
        qkv = self.qkv_proj(hidden_states)
        q_size = self.config.num_attention_heads * self.head_dim
        kv_size = self.config.num_key_value_heads * self.head_dim
        return qkv.split((q_size, kv_size, kv_size), dim=-1)
    if getattr(self, "_tuneforge_fused_qkv", False):
        from tuneforge.lora.fused import fused_qkv

        qkv = fused_qkv(self, hidden_states)
        if qkv is not None:
            return qkv
    return self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                       past_key_values=None, **kwargs):
    """Llama-shaped attention with the RoPE kernel; hidden_states: [B, S, H] -> ([B, S, H], weights).

    The steps and their order are transformers' (Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3,
    Granite, OLMo 2, StableLM, StarCoder2); `self._tuneforge_qk_norm` / `_tuneforge_softcap` carry
    the family's variations, the sliding window comes from the module or its config as there.
    """
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q, k, v = _project_qkv(self, hidden_states)
    qk_norm = self._tuneforge_qk_norm
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
    if self._tuneforge_softcap:
        extra["softcap"] = self.attn_logit_softcapping
    sliding = self.sliding_window if hasattr(self, "sliding_window") else getattr(self.config, "sliding_window", None)
    if sliding is not None:
        extra["sliding_window"] = sliding
    dropout = getattr(self, "attention_dropout", 0.0) if self.training else 0.0
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is not None and self._tuneforge_varlen and past_key_values is None and input_shape[0] == 1:
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


def _patch_attention(model, spec: FamilySpec) -> str | None:
    if spec.attention != "rope":
        logger.info("family %s keeps transformers' attention (its RoPE or layout does not fit the kernel)", spec.name)
        return None
    modules = _decoder_modules(model, "self_attn")
    reasons = [reason for _, attn in modules if (reason := _attention_fits(attn, spec))]
    if not modules or reasons:
        logger.info("attention not patched: %s", reasons[0] if reasons else "no self_attn modules found")
        return None
    for _, attn in modules:
        attn._tuneforge_qkv = spec.qkv
        attn._tuneforge_qk_norm = spec.qk_norm
        attn._tuneforge_softcap = spec.attn_softcap and getattr(attn, "attn_logit_softcapping", None) is not None
        attn._tuneforge_varlen = False  # _patch_varlen decides
        attn.forward = types.MethodType(_attention_forward, attn)
    return "rope"


def _patch_varlen(model, spec: FamilySpec) -> str | None:
    """"varlen" when padding-free batches can run the varlen kernel: the attention is ours and every
    decoder layer hands its keyword arguments (cu_seq_lens_q, max_length_q) on to it.

    Read from the decoder layer's source once, here: some families' layers call self_attn with
    a fixed argument list (StableLM in transformers 5), and the boundaries would never arrive.
    Without "varlen", padding-free batches keep transformers' block-diagonal mask (correct, slower).
    """
    import inspect
    import re

    if not record_of(model).switches.varlen:
        logger.info("%s=0: padding-free batches use transformers' block-diagonal mask", VARLEN_ENV)
        return None
    attentions = _decoder_modules(model, "self_attn")
    if not attentions or any(getattr(a.forward, "__func__", None) is not _attention_forward for _, a in attentions):
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
    for _, attn in attentions:
        attn._tuneforge_varlen = True
    return "varlen"


# --- MLP -------------------------------------------------------------------------------------------

# The gated kernels' activations, and the PyTorch functions they must equal.
_KERNEL_ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


def _activation_of(mlp: nn.Module) -> str | None:
    """The kernel activation that `mlp`'s own activation module computes, or None.

    Probed numerically rather than by class name: transformers renames activation classes
    across versions, and "gelu_new" equals "gelu_pytorch_tanh" under another name.
    """
    act = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)
    if act is None:
        return None
    probe = torch.linspace(-6.0, 6.0, 97)
    with torch.no_grad():
        try:
            got = act(probe)
        except Exception:  # noqa: BLE001 - an activation that cannot run on a probe is not one of ours
            return None
        for name, reference in _KERNEL_ACTIVATIONS.items():
            if torch.allclose(got, reference(probe), rtol=0, atol=1e-6):
                return name
    return None


def gated(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up by the SwiGLU / GeGLU kernels; gate, up: [..., I] -> [..., I]."""
    if activation == "silu":
        from tuneforge.kernels.swiglu import swiglu

        return swiglu(gate, up)
    from tuneforge.kernels.geglu import geglu

    return geglu(gate, up, approximate="tanh" if activation == "gelu_tanh" else "none")


def _gated_mlp_forward(self, x):
    """down(act(gate(x)) * up(x)); x: [..., H] -> [..., H] (one fused LoRA Function after patch_lora)."""
    if getattr(self, "_tuneforge_fused_lora", False):
        from tuneforge.lora.fused import fused_mlp

        out = fused_mlp(self, x)
        if out is not None:
            return out
    return self.down_proj(gated(self.gate_proj(x), self.up_proj(x), self._tuneforge_activation))


def _gated_fused_mlp_forward(self, x):
    """Phi-3: gate_up_proj(x) = [gate | up]; down(act(gate) * up); x: [..., H] -> [..., H]."""
    gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    return self.down_proj(gated(gate, up, self._tuneforge_activation))


def _patch_mlp(model, spec: FamilySpec) -> str | None:
    if spec.mlp is None:
        return None
    projections = ("gate_proj", "up_proj", "down_proj") if spec.mlp == "gated" else ("gate_up_proj", "down_proj")
    forward = _gated_mlp_forward if spec.mlp == "gated" else _gated_fused_mlp_forward
    modules = _decoder_modules(model, "mlp")
    activations = {_activation_of(mlp) for _, mlp in modules}
    missing = [p for _, mlp in modules for p in projections if not hasattr(mlp, p)]
    if not modules or missing or len(activations) != 1 or None in activations:
        logger.info(
            "MLP not patched: %s", f"missing {missing[0]}" if missing else
            "no mlp modules" if not modules else f"activation is not one the gated kernels compute ({activations})",
        )
        return None
    (activation,) = activations
    for _, mlp in modules:
        mlp._tuneforge_activation = activation
        mlp.forward = types.MethodType(forward, mlp)
    return "swiglu" if activation == "silu" else "geglu"


# --- loss ------------------------------------------------------------------------------------------


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


def _causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                       inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
    """With labels: the loss by the chunked fused cross-entropy, logits=None. Without: the model's own forward.

    input_ids / labels: [B, S] (labels unshifted, -100 ignored, as transformers); `num_items_in_batch`
    (gradient accumulation) makes the loss a sum over that many tokens, as transformers' loss does.
    """
    original = type(self).forward.__get__(self)
    lm_head = self.get_output_embeddings()
    why_not = None if labels is None else _unchunkable_head(lm_head)
    if labels is None or why_not:
        if why_not and not getattr(self, "_tuneforge_warned_head", False):
            self._tuneforge_warned_head = True
            logger.warning("chunked loss not used: %s; the loss uses full [tokens x vocab] logits", why_not)
        return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                        use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from tuneforge.kernels.cross_entropy import fused_linear_cross_entropy

    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    if kwargs.get("cu_seq_lens_q") is not None and past_key_values is None and "varlen" in self.tuneforge.kernels:
        # A padding-free batch: the patched attention reads the sample boundaries from cu_seq_lens
        # (varlen kernel). transformers would otherwise detect the packing from position_ids (a
        # device sync) and build a [T, T] block-diagonal mask that nothing reads (256 MB at 16k
        # tokens); a mask that is already 4-D is passed through untouched, and this one is empty,
        # so any attention that did try to read it would fail loudly rather than compute wrongly.
        device = (input_ids if input_ids is not None else inputs_embeds).device
        attention_mask = torch.empty((1, 1, 0, 0), dtype=torch.bool, device=device)
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
    softcap, scale = self.tuneforge.logits
    loss = fused_linear_cross_entropy(
        hidden.to(weight.dtype), weight, labels if shift_labels is None else shift_labels,
        ignore_index=ignore_index, logit_softcap=softcap, logit_scale=scale,
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


def _patch_loss(model, spec: FamilySpec) -> str | None:
    if not isinstance(model.get_output_embeddings(), nn.Linear):
        logger.info("loss not patched: the output layer is not a Linear")
        return None
    record_of(model).logits = _logit_transform(model, spec)
    model.forward = types.MethodType(_causal_lm_forward, model)
    return "fused_cross_entropy"


# --- bitsandbytes 4-bit linears --------------------------------------------------------------------


def _patch_linear4bit(model, spec: FamilySpec) -> str | None:
    """Every bitsandbytes Linear4bit's forward -> `nf4_gemv.linear4bit_forward` (decode steps only)."""
    import bitsandbytes as bnb

    from tuneforge.patch.linear4bit import linear4bit_forward

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.forward = types.MethodType(linear4bit_forward, layer)
    return "nf4_gemv" if layers else None
