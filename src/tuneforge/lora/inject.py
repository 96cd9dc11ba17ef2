"""Inject LoRA adapters through peft: W' = W + s·B·A with s = alpha/r (or alpha/sqrt(r), rsLoRA).

peft owns the adapter format (so adapters reload with plain peft); we choose the defaults, freeze
the base, set up gradient checkpointing, and hand the model to the fused-LoRA patch.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"


class LoRAConfigError(ValueError):
    """An argument of get_peft_model is out of range or unsupported; the message says which."""


def trainable_parameter_summary(model) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(_stored_numel(p) for p in model.parameters())
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)"


def _stored_numel(parameter) -> int:
    # bitsandbytes packs two 4-bit values per byte: count logical elements, not storage bytes.
    quant_state = getattr(parameter, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return int(torch.Size(quant_state.shape).numel())
    return parameter.numel()


def _validate(r, lora_alpha, lora_dropout, bias, loftq_config, target_modules):
    if not isinstance(r, int) or r <= 0:
        raise LoRAConfigError(f"r must be a positive integer, got {r!r}")
    if lora_alpha <= 0:
        raise LoRAConfigError(f"lora_alpha must be > 0, got {lora_alpha!r}")
    if not 0.0 <= lora_dropout < 1.0:
        raise LoRAConfigError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
    if bias != "none":
        raise LoRAConfigError(
            f"bias={bias!r} is not supported: tuneforge trains LoRA with bias='none' (base biases stay frozen)"
        )
    if loftq_config:
        raise NotImplementedError("loftq_config is not supported by tuneforge; leave it None")
    if isinstance(target_modules, str) and target_modules != ALL_LINEAR:
        raise LoRAConfigError(f"target_modules must be a list of module names or {ALL_LINEAR!r}, got {target_modules!r}")


def _check_targets_exist(model, target_modules) -> None:
    if target_modules == ALL_LINEAR:
        return
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [name for name in target_modules if name not in names]
    if missing:
        linear = sorted({
            name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) or "Linear" in type(module).__name__
        })
        raise LoRAConfigError(
            f"target_modules {missing} not found in {type(model).__name__}; its linear layers are {linear}"
        )


def _check_target_parameters(model, target_parameters, lora_dropout) -> None:
    """Every name in `target_parameters` names parameters of `model` as peft matches them (the
    full name or its trailing part: "gate_up_proj", "mlp.gate.weight" for the routers)."""
    if not target_parameters:
        return
    if lora_dropout:
        raise LoRAConfigError(
            f"lora_dropout={lora_dropout}: LoRA on parameters (target_parameters={list(target_parameters)}) "
            "cannot drop out its input (peft's ParamWrapper); use lora_dropout=0, or target_parameters=[] "
            "to train the attention only")
    names = [name for name, _ in model.named_parameters()]
    missing = [target for target in target_parameters
               if not any(name == target or name.endswith("." + target) for name in names)]
    if missing:
        stacked = sorted({name.rsplit(".", 1)[-1] for name, p in model.named_parameters() if p.dim() == 3})
        raise LoRAConfigError(f"target_parameters {missing} match no parameter of {type(model).__name__}; "
                              f"its stacked expert parameters are {stacked or 'none'}")


def _patch_experts_lora(peft_model, spec, use_kernels) -> None:
    """LoRA on stacked experts through kernels.moe (models.moe), on the same switch as the fused LoRA."""
    from tuneforge.models.moe import patch_moe_lora
    from tuneforge.models.record import record_of

    record = record_of(peft_model)
    enabled = use_kernels if use_kernels is not None else record.switches.kernels
    record.lora_kernels = [*record.lora_kernels, *patch_moe_lora(peft_model, spec, enabled=enabled)]


def get_peft_model(
    model,
    r: int = 16,
    target_modules=None,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    bias: str = "none",
    use_gradient_checkpointing=True,
    random_state: int = 3407,
    use_rslora: bool = False,
    modules_to_save: list[str] | None = None,
    layers_to_transform: list[int] | None = None,
    init_lora_weights=True,
    loftq_config=None,
    max_seq_length: int | None = None,
    use_kernels: bool | None = None,
    target_parameters: list[str] | None = None,
):
    """Wrap `model` (from `FastLanguageModel.from_pretrained`) with LoRA adapters; returns a PeftModel.

    target_modules: list of module names, or "all-linear"; None takes the family's defaults
    (the seven projections q,k,v,o,gate,up,down for Llama-like models).
    use_gradient_checkpointing: True / "standard" (transformers'), "unsloth" / "offload"
    (layer inputs offloaded to CPU memory), or False.
    target_parameters: names of stacked 3-D expert parameters for LoRA (peft's target_parameters);
    None takes the family's experts (("gate_up_proj", "down_proj") for MoE families), [] none.
    """
    import peft

    from tuneforge.models.loader import family_of

    if isinstance(model, peft.PeftModel):
        raise LoRAConfigError("model already has LoRA adapters (it is a PeftModel); load the base model again")
    spec = family_of(model)
    if target_modules is None:
        target_modules = list(spec.lora_targets) if spec else ALL_LINEAR
    _validate(r, lora_alpha, lora_dropout, bias, loftq_config, target_modules)
    _check_targets_exist(model, target_modules)
    if target_parameters is None:
        target_parameters = list(spec.experts) if spec else []
    _check_target_parameters(model, target_parameters, lora_dropout)
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    config = peft.LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
        bias=bias,
        use_rslora=use_rslora,
        modules_to_save=modules_to_save,
        layers_to_transform=layers_to_transform,
        init_lora_weights=init_lora_weights,
        target_parameters=list(target_parameters) or None,
        task_type="CAUSAL_LM",
    )
    # peft draws lora_A from the global RNG: seed it so the same call gives the same adapter.
    torch.manual_seed(random_state)
    # autocast_adapter_dtype (peft's default) keeps adapter weights in fp32 under a 16-bit base, so
    # small updates don't round away.
    # A model loaded by plain transformers never went through our loader: bitsandbytes may not
    # repack its NF4 weights on the CPU from here on either (integration/bnb.py; a no-op otherwise).
    from tuneforge.integration.bnb import prevent_cpu_repack

    prevent_cpu_repack(model)
    peft_model = peft.get_peft_model(model, config)
    return finish_peft_model(peft_model, spec, use_gradient_checkpointing, use_kernels)


def finish_peft_model(peft_model, spec, use_gradient_checkpointing, use_kernels: bool | None = None):
    """What every LoRA model of ours gets, new (get_peft_model) or reloaded from an adapter folder:
    gradient checkpointing, the fused LoRA patch, a trainable-parameter line (FastLanguageModel adds
    the export methods)."""
    from tuneforge.patch.activation_checkpointing import enable_gradient_checkpointing

    enable_gradient_checkpointing(peft_model, use_gradient_checkpointing)

    from tuneforge.lora.fused import patch_lora

    patch_lora(peft_model, spec, enabled=use_kernels)  # None: the base model's switch (patch_model)
    _patch_experts_lora(peft_model, spec, use_kernels)
    summary = trainable_parameter_summary(peft_model)
    logger.info(summary)
    print(summary, flush=True)
    return peft_model

