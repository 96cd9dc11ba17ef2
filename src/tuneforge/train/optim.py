"""The optimiser: parameter groups for LoRA training and the table of optimisers we build.

Groups (only trainable parameters; empty groups are left out):
    "lora"        LoRA matrices and any other trainable weight  -> learning_rate, weight_decay
    "no_decay"    1-D parameters: biases, norm weights          -> learning_rate, no weight decay
    "embeddings"  embed_tokens / lm_head when trained (modules_to_save, continued pre-training)
                                                                 -> embedding_learning_rate, weight_decay
New embedding rows learn from scratch while LoRA nudges a trained model, so continued
pre-training usually gives the embeddings a 2-10x smaller learning rate (Unsloth's
`embedding_learning_rate`).

8-bit AdamW (bitsandbytes, block-wise quantised moments) stores 2 bytes of optimiser state per
parameter instead of 8. Where bitsandbytes cannot run its 8-bit step on the parameters' device
we build torch's AdamW instead and say so in a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# Parameters whose qualified name has one of these components go to the "embeddings" group
# (with peft's modules_to_save: "...embed_tokens.modules_to_save.default.weight").
EMBEDDING_MODULES = ("embed_tokens", "lm_head")


@dataclass(frozen=True)
class OptimizerSpec:
    """One entry of the optimiser table.

    torch_fused:      torch.optim.AdamW with fused=True (None: not a torch optimiser).
    bitsandbytes:     name of the class in `bitsandbytes.optim` (None: torch's AdamW).
    unpaged:          the bitsandbytes class to use instead when there is no CUDA device to page from.
    """

    torch_fused: bool | None = None
    bitsandbytes: str | None = None
    unpaged: str | None = None


# Names as transformers' TrainingArguments.optim spells them, so SFTConfig(optim=...) maps directly.
OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw_torch": OptimizerSpec(torch_fused=False),
    "adamw_torch_fused": OptimizerSpec(torch_fused=True),
    "adamw_8bit": OptimizerSpec(bitsandbytes="AdamW8bit"),
    "adamw_bnb_8bit": OptimizerSpec(bitsandbytes="AdamW8bit"),
    # Paged: optimiser state in CUDA unified memory, evicted to the CPU under memory pressure.
    "paged_adamw_8bit": OptimizerSpec(bitsandbytes="PagedAdamW8bit", unpaged="AdamW8bit"),
    "paged_adamw_32bit": OptimizerSpec(bitsandbytes="PagedAdamW32bit", unpaged="AdamW32bit"),
}


def parameter_groups(
    model: torch.nn.Module,
    *,
    learning_rate: float,
    embedding_learning_rate: float | None = None,
    weight_decay: float = 0.0,
) -> list[dict]:
    """The optimiser's parameter groups for `model`'s trainable parameters (see the module docstring).

    Each group is a dict with "name", "params", "lr" and "weight_decay"; empty groups are left out.
    `embedding_learning_rate=None` gives the embeddings `learning_rate`.
    """
    params: dict[str, list[torch.nn.Parameter]] = {"lora": [], "no_decay": [], "embeddings": []}
    # named_parameters() yields a tied parameter (embed_tokens = lm_head) once.
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if any(part in EMBEDDING_MODULES for part in name.split(".")):
            params["embeddings"].append(param)
        elif param.ndim < 2:
            params["no_decay"].append(param)
        else:
            params["lora"].append(param)
    if not any(params.values()):
        raise ValueError(
            "the model has no trainable parameters: add LoRA adapters first (FastLanguageModel.get_peft_model)"
        )
    if embedding_learning_rate is not None and not params["embeddings"]:
        logger.warning(
            "embedding_learning_rate=%g has no effect: neither embed_tokens nor lm_head is trained "
            "(list them in modules_to_save to train them)",
            embedding_learning_rate,
        )
    settings = {
        "lora": (learning_rate, weight_decay),
        "no_decay": (learning_rate, 0.0),
        "embeddings": (learning_rate if embedding_learning_rate is None else embedding_learning_rate, weight_decay),
    }
    return [
        {"name": name, "params": group, "lr": settings[name][0], "weight_decay": settings[name][1]}
        for name, group in params.items()
        if group
    ]


def build_optimizer(
    model: torch.nn.Module,
    *,
    optim: str = "adamw_8bit",
    learning_rate: float,
    embedding_learning_rate: float | None = None,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """The optimiser `optim` (a key of OPTIMIZERS) over `model`'s trainable parameters, in groups.

    Logs one line with the groups' sizes, learning rates and weight decay.
    """
    if optim not in OPTIMIZERS:
        raise ValueError(f"optim={optim!r} is not supported; write one of {', '.join(OPTIMIZERS)}")
    spec = OPTIMIZERS[optim]
    groups = parameter_groups(
        model, learning_rate=learning_rate, embedding_learning_rate=embedding_learning_rate, weight_decay=weight_decay
    )
    device = groups[0]["params"][0].device
    optimizer_class, built = _optimizer_class(optim, spec, device)
    extra = {"fused": True} if spec.torch_fused else {}
    optimizer = optimizer_class(groups, lr=learning_rate, betas=betas, eps=eps, weight_decay=weight_decay, **extra)
    summary = ", ".join(
        f"{g['name']} {sum(p.numel() for p in g['params']):,} params (lr {g['lr']:g}, weight decay {g['weight_decay']:g})"
        for g in groups
    )
    logger.info("optimizer %s: %s", built, summary)
    return optimizer


def _optimizer_class(optim: str, spec: OptimizerSpec, device: torch.device) -> tuple[type, str]:
    """(class to build, what to call it in the log), after checking bitsandbytes can run on `device`."""
    if spec.bitsandbytes is None:
        return torch.optim.AdamW, optim
    class_name = spec.bitsandbytes
    if spec.unpaged is not None and device.type != "cuda":
        logger.warning(
            "optim=%s: paging needs a CUDA device (parameters are on %s); using bitsandbytes %s instead",
            optim, device.type, spec.unpaged,
        )
        class_name = spec.unpaged
    try:
        import bitsandbytes.optim as bnb_optim

        optimizer_class = getattr(bnb_optim, class_name)
    except ImportError as error:
        problem = f"bitsandbytes cannot be imported ({error})"
    else:
        problem = _bitsandbytes_problem(optimizer_class, device)
        if problem is None:
            return optimizer_class, f"{optim} (bitsandbytes {class_name})"
    logger.warning(
        "optim=%s: bitsandbytes %s does not run on %s (%s); falling back to torch.optim.AdamW "
        "(32-bit state: 4x the optimiser memory)",
        optim, class_name, device.type, problem,
    )
    return torch.optim.AdamW, f"adamw_torch (fallback for {optim})"


_PROBED: dict[tuple[type, str], str | None] = {}


def _bitsandbytes_problem(optimizer_class: type, device: torch.device) -> str | None:
    """None if `optimizer_class` can take a step on `device`, else what went wrong. Cached per device type.

    A real step is the only reliable test: bitsandbytes imports on every platform and fails (or not)
    when its kernels are first called.
    """
    key = (optimizer_class, device.type)
    if key not in _PROBED:
        # 4096 elements: bitsandbytes keeps smaller tensors' state in 32 bits, which would not test
        # the 8-bit kernels.
        probe = torch.nn.Parameter(torch.ones(4096, device=device))
        probe.grad = torch.full_like(probe, 0.5)
        try:
            optimizer_class([probe], lr=1e-3).step()
            problem = None if torch.isfinite(probe).all() else "the probe step gave non-finite values"
        except Exception as error:  # any failure means: do not train with it
            problem = f"{type(error).__name__}: {error}"
        _PROBED[key] = problem
    return _PROBED[key]


def create_optimizer_for_trainer(trainer, model: torch.nn.Module | None = None) -> torch.optim.Optimizer | None:
    """The optimiser a transformers / TRL Trainer should use, built from `trainer.args`.

    For a Trainer subclass:

        def create_optimizer(self, *args, **kwargs):
            if self.optimizer is None:
                self.optimizer = create_optimizer_for_trainer(self)
            return super().create_optimizer(*args, **kwargs)  # builds only if still None

    Reads args.optim, learning_rate, weight_decay, adam_beta1/2, adam_epsilon and, when the
    arguments class has it, embedding_learning_rate. Returns None (and logs it) for an `optim` not
    in OPTIMIZERS, leaving it to transformers; that is an error if embedding_learning_rate is set,
    since transformers would ignore it.
    """
    args = trainer.args
    optim = getattr(args.optim, "value", args.optim)  # TrainingArguments stores an OptimizerNames enum
    embedding_learning_rate = getattr(args, "embedding_learning_rate", None)
    if optim not in OPTIMIZERS:
        if embedding_learning_rate is not None:
            raise ValueError(
                f"embedding_learning_rate needs one of the optimizers {', '.join(OPTIMIZERS)}; got optim={optim!r}"
            )
        logger.info("optimizer %s: built by transformers' Trainer (not in tuneforge's table)", optim)
        return None
    if getattr(args, "optim_args", None):
        raise ValueError(f"optim_args={args.optim_args!r} is not supported with optim={optim!r}; remove it")
    return build_optimizer(
        trainer.model if model is None else model,
        optim=optim,
        learning_rate=args.learning_rate,
        embedding_learning_rate=embedding_learning_rate,
        weight_decay=args.weight_decay,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )
