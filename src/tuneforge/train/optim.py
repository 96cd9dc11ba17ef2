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

bitsandbytes steps one tensor at a time: a kernel launch, a device synchronisation and about
100 us of Python per tensor (224 LoRA tensors on Llama-3.2-1B with r=16 on 7 projections, on a
step whose pace the CPU sets). `FlatAdamW8bit` does the same 8-bit AdamW over one flat buffer
per (group, device, dtype): the parameters become views into it, their gradients are gathered
into it by one `torch.cat`, and bitsandbytes steps it once. Each parameter's segment is padded
to bitsandbytes' quantisation block, so every block holds the same elements as it would per
parameter and the result is bit-identical. "adamw_8bit" / "adamw_bnb_8bit" build it unless
TUNEFORGE_FLAT_OPTIMIZER=0.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import bitsandbytes.optim as bnb_optim
import torch

from tuneforge.models.record import record_of
from tuneforge.switches import FLAT_OPTIMIZER_ENV

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
    flat:             step over flat buffers (FlatAdamW8bit) unless switched off.
    """

    torch_fused: bool | None = None
    bitsandbytes: str | None = None
    unpaged: str | None = None
    flat: bool = False


# Names as transformers' TrainingArguments.optim spells them, so SFTConfig(optim=...) maps directly.
OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw_torch": OptimizerSpec(torch_fused=False),
    "adamw_torch_fused": OptimizerSpec(torch_fused=True),
    "adamw_8bit": OptimizerSpec(bitsandbytes="AdamW8bit", flat=True),
    "adamw_bnb_8bit": OptimizerSpec(bitsandbytes="AdamW8bit", flat=True),
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
    flat: bool | None = None,
) -> torch.optim.Optimizer:
    """The optimiser `optim` (a key of OPTIMIZERS) over `model`'s trainable parameters, in groups.

    flat: for the 8-bit AdamW names, step over flat buffers (`FlatAdamW8bit`: same results, one
          bitsandbytes update per buffer instead of per tensor). None: the model's switch
          (`flat_optimizer`, resolved at load: off with TUNEFORGE_FLAT_OPTIMIZER=0). Leave it off where something reads the optimizer's
          parameters' gradients between backward and step (a GradScaler's unscale_: fp16 training).

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
    if optimizer_class is bnb_optim.AdamW8bit and spec.flat and _flat_wanted(flat, optim, model):
        optimizer_class, built = FlatAdamW8bit, f"{optim} (bitsandbytes AdamW8bit over flat buffers)"
    extra = {"fused": True} if spec.torch_fused else {}
    optimizer = optimizer_class(groups, lr=learning_rate, betas=betas, eps=eps, weight_decay=weight_decay, **extra)
    summary = ", ".join(
        f"{g['name']} {sum(p.numel() for p in g['params']):,} params (lr {g['lr']:g}, weight decay {g['weight_decay']:g})"
        for g in groups
    )
    logger.info("optimizer %s: %s", built, summary)
    return optimizer


def _flat_wanted(flat: bool | None, optim: str, model: torch.nn.Module) -> bool:
    """The caller's `flat` wins; else the switch the model was loaded with (tuneforge.switches)."""
    if flat is not None:
        return flat
    if not record_of(model).switches.flat_optimizer:
        logger.info("optim=%s: %s=0, bitsandbytes steps each tensor on its own", optim, FLAT_OPTIMIZER_ENV)
        return False
    return True


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
    optimizer_class = getattr(bnb_optim, class_name)
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
    flat = None
    if getattr(args, "fp16", False) and OPTIMIZERS[optim].flat:
        # fp16's GradScaler unscales (and checks for inf) the optimizer's parameters' gradients
        # before step; the flat buffers only get theirs inside step.
        logger.info("optim=%s with fp16: bitsandbytes steps each tensor on its own (the gradient scaler "
                    "reads per-tensor gradients before the step)", optim)
        flat = False
    return build_optimizer(
        trainer.model if model is None else model,
        optim=optim,
        learning_rate=args.learning_rate,
        embedding_learning_rate=embedding_learning_rate,
        weight_decay=args.weight_decay,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        flat=flat,
    )


# --- 8-bit AdamW over flat buffers -----------------------------------------------------------

# step() holds a gathered copy of the flattened gradients: LoRA r=16 on all 7 projections of an
# 8B model flattens 42M elements (168 MB in fp32). A tensor above MAX_FLAT_TENSOR elements keeps
# its own update (its kernel, ~30 us on an H100, already outweighs a launch), and no more than
# MAX_FLAT_TOTAL elements are flattened, so full fine-tuning or very high ranks do not double
# their gradient memory. (bitsandbytes' kernels count elements in int32: both stay far below.)
MAX_FLAT_TENSOR = 2**22
MAX_FLAT_TOTAL = 2**27
# The keys of bitsandbytes' 8-bit two-state entry; those not listed as per element or per block
# are shared by every parameter (step count, quantisation maps).
_PER_ELEMENT, _PER_BLOCK, _SHARED = ("state1", "state2"), ("absmax1", "absmax2"), ("step", "qmap1", "qmap2")
_STATE_ORDER = ("step", "state1", "qmap1", "state2", "qmap2", "absmax1", "absmax2")  # as bitsandbytes makes it


@dataclass
class _FlatBuffer:
    """One flat parameter and the model parameters that live in it.

    param:    [total] what bitsandbytes steps; members[i] is param[offsets[i] : offsets[i] + numel].
    members:  the model's parameters, in their group's order.
    pads:     per member, zeros [padded size - numel] that complete its last block (None: none needed).
    pointers: each member's data_ptr() when it became a view, to catch a later `p.data = ...`.
    """

    param: torch.nn.Parameter
    members: list[torch.nn.Parameter]
    offsets: list[int]
    pads: list[torch.Tensor | None]
    pointers: tuple[int, ...] = field(default=())


class FlatAdamW8bit(bnb_optim.AdamW8bit):
    """bitsandbytes' AdamW8bit, stepped once per flat buffer instead of once per tensor.

    In each parameter group, the tensors bitsandbytes gives 8-bit state (at least `min_8bit_size`
    elements) that are plain, dense, contiguous, trainable Parameters owning their storage, of at
    most MAX_FLAT_TENSOR elements (and MAX_FLAT_TOTAL in all), are copied into one flat buffer per
    (device, dtype) and become
    views into it (`p.data = flat[a:b].view(p.shape)`): bitsandbytes' in-place update of the buffer
    is the update of the model. Each segment is padded with zeros to a whole number of
    quantisation blocks (256 elements), so every block of the 8-bit moments holds the elements it
    would hold for the tensor alone. The pads get zero gradients; their values never reach the
    model (bitsandbytes' CPU quantiser stores a zero moment as ~1e-5 of its block's absmax, so on
    the CPU they drift a little). The other tensors (32-bit state, DTensor / FSDP shards, views,
    ...) are stepped one by one as before.

    step() gathers the members' gradients into each buffer's .grad with one torch.cat and drops it
    after the step. A member without a gradient counts as zeros (AdamW8bit alone would skip it: its
    moments would not decay, nor weight decay apply); a buffer none of whose members has one is
    skipped. state_dict() is what AdamW8bit saves for the same parameters, and load_state_dict()
    takes either, so checkpoints move between the two classes.

    Results equal AdamW8bit's bit for bit (tests/train/test_optim.py, on the CPU kernels). One
    difference remains possible, in the last, partial block of a tensor: its pad's first moment
    (on the CPU ~1e-5 x the block's absmax; on CUDA zero, where the kernel instead reads the
    missing tail of a lone tensor as 5.5e-7 x the previous absmax) enters the block's new absmax,
    which changes it only if every real moment in the block is smaller still.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, min_8bit_size=4096):
        # Read by add_param_group, which torch's __init__ calls once per group.
        self._min_8bit_size = min_8bit_size
        self._block = _quantisation_block()
        self._group_members: list[list[torch.nn.Parameter]] = []  # per group, the model's parameters
        self._flat_buffers: list[_FlatBuffer] = []
        self._buffer_of: dict[torch.nn.Parameter, _FlatBuffer] = {}
        self._where: dict[torch.nn.Parameter, tuple[_FlatBuffer, int]] = {}
        self._storages: set[tuple[torch.device, int]] = set()
        self._unflattened: dict[str, int] = {}
        self._flat_elements = 0  # padded, over all buffers
        self._warned_missing = False
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size)
        flat = [p for b in self._flat_buffers for p in b.members]
        alone = ", ".join(f"{count} {why}" for why, count in self._unflattened.items())
        logger.info(
            "FlatAdamW8bit: %d tensors (%s elements) in %d flat buffer(s); %d stepped one by one%s",
            len(flat), f"{sum(p.numel() for p in flat):,}", len(self._flat_buffers),
            sum(self._unflattened.values()), f" ({alone})" if alone else "",
        )

    # -- building ---------------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group over [flat buffers] + [tensors stepped alone]; remembers the
        group's own parameters for state_dict()."""
        group = dict(param_group)
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        known = set(self._where) | {p for g in self.param_groups for p in g["params"]}
        if any(p in known for p in params) or len(set(params)) != len(params):
            raise ValueError("some parameters appear more than once in the optimizer's parameter groups")
        manager = bnb_optim.GlobalOptimManager.get_instance()
        overridden = set(manager.pid2config)
        overridden |= {id(getattr(module, name)) for module, name, _ in manager.module_weight_config_triple}
        candidates: dict[tuple[torch.device, torch.dtype], list[torch.nn.Parameter]] = {}
        alone = []

        def step_alone(p, why):
            alone.append(p)
            self._unflattened[why] = self._unflattened.get(why, 0) + 1

        for p in params:
            why = self._why_alone(p, overridden)
            if why is None and self._flat_elements + _round_up(p.numel(), self._block) > MAX_FLAT_TOTAL:
                why = f"beyond the flat buffers' {MAX_FLAT_TOTAL:,} elements"
            if why is None:
                candidates.setdefault((p.device, p.dtype), []).append(p)
                self._flat_elements += _round_up(p.numel(), self._block)
            else:
                step_alone(p, why)
        buffers = []
        for members in candidates.values():
            if len(members) == 1:  # nothing to save: its own update is as fast
                self._flat_elements -= _round_up(members[0].numel(), self._block)
                step_alone(members[0], "alone in their group")
            else:
                buffers.append(self._flatten(members))
        super().add_param_group({**group, "params": [b.param for b in buffers] + alone})
        self._group_members.append(params)

    def _why_alone(self, p: torch.Tensor, overridden: set[int]) -> str | None:
        """Why `p` is stepped on its own (None: it goes into a flat buffer)."""
        if not p.requires_grad:
            return "frozen"
        if type(p) is not torch.nn.Parameter or type(p.data) is not torch.Tensor or p.layout != torch.strided:
            return "tensor subclasses (DTensor, ...) or sparse"
        storage = (p.device, p.untyped_storage().data_ptr())
        # A view, or a tensor another parameter shares: making it a view of the buffer would
        # detach it from the tensors it shares memory with.
        shared = storage in self._storages or p.storage_offset() != 0 or (
            p.untyped_storage().nbytes() != p.numel() * p.element_size()
        )
        self._storages.add(storage)
        if p.numel() < self._min_8bit_size:
            return f"with 32-bit state (< {self._min_8bit_size} elements)"
        if p.numel() > MAX_FLAT_TENSOR:
            return f"large (> {MAX_FLAT_TENSOR:,} elements)"
        if shared or not p.is_contiguous():
            return "sharing storage or non-contiguous"
        if id(p) in overridden:
            return "with a bitsandbytes config override"
        return None

    def _flatten(self, members: list[torch.nn.Parameter]) -> _FlatBuffer:
        """Copy `members` into one zero-padded buffer and make each a view into it."""
        sizes = [_round_up(p.numel(), self._block) for p in members]
        offsets = list(itertools.accumulate(sizes, initial=0))[:-1]
        flat = torch.zeros(sum(sizes), dtype=members[0].dtype, device=members[0].device)
        zeros = torch.zeros(self._block, dtype=flat.dtype, device=flat.device)
        with torch.no_grad():
            for p, start in zip(members, offsets):
                segment = flat[start : start + p.numel()]
                segment.copy_(p.reshape(-1))
                p.data = segment.view(p.shape)
        buffer = _FlatBuffer(
            param=torch.nn.Parameter(flat, requires_grad=False),
            members=members,
            offsets=offsets,
            pads=[zeros[: size - p.numel()] if size > p.numel() else None for p, size in zip(members, sizes)],
            pointers=tuple(p.data_ptr() for p in members),
        )
        self._flat_buffers.append(buffer)
        self._buffer_of[buffer.param] = buffer
        self._where.update({p: (buffer, i) for i, p in enumerate(members)})
        return buffer

    # -- stepping ---------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for buffer in self._flat_buffers:
            self._gather_gradients(buffer)
        try:
            # AdamW8bit's own step, without running the optimizer step hooks a second time (torch
            # wraps each optimizer class's step in them; this class's step is wrapped already).
            _without_step_hooks(super().step.__func__)(self)
        finally:
            for buffer in self._flat_buffers:
                buffer.param.grad = None
        return loss

    def _gather_gradients(self, buffer: _FlatBuffer) -> None:
        if tuple(p.data_ptr() for p in buffer.members) != buffer.pointers:
            moved = next(i for i, p in enumerate(buffer.members) if p.data_ptr() != buffer.pointers[i])
            p = buffer.members[moved]
            raise RuntimeError(
                f"FlatAdamW8bit: a parameter of shape {list(p.shape)} no longer lives in the optimizer's flat "
                "buffer (its .data was replaced after the optimizer was built: model.to(), a dtype cast, "
                "load_state_dict(assign=True), ...); build the optimizer after such changes, or set "
                f"{FLAT_OPTIMIZER_ENV}=0"
            )
        pieces, missing = [], 0
        for p, pad in zip(buffer.members, buffer.pads):
            grad = p.grad
            if grad is None:
                missing += 1
                grad = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
            pieces.append(grad.reshape(-1))
            if pad is not None:
                pieces.append(pad)
        if missing == len(buffer.members):
            buffer.param.grad = None
            return
        if missing and not self._warned_missing:
            self._warned_missing = True
            logger.warning(
                "FlatAdamW8bit: %d of %d tensors in a flat buffer have no gradient this step; they are stepped "
                "with zero gradients (their moments decay and weight decay applies; AdamW8bit would skip them)",
                missing, len(buffer.members),
            )
        buffer.param.grad = torch.cat(pieces)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Also clears the gradients of the parameters that live in the flat buffers."""
        super().zero_grad(set_to_none)
        for p in self._where:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad = p.grad.detach().zero_()

    # -- state ------------------------------------------------------------------------------

    def parameter_state(self, param: torch.Tensor) -> dict:
        """`param`'s optimizer state as AdamW8bit keeps it (for a flattened parameter: views into
        its buffer's state); empty before its first step."""
        if param not in self._where:
            return self.state.get(param, {})
        buffer, i = self._where[param]
        state = self.state.get(buffer.param, {})
        start, n = buffer.offsets[i], param.numel()
        first_block, blocks = start // self._block, _round_up(n, self._block) // self._block
        view = {}
        for key, value in state.items():
            if key in _PER_ELEMENT:
                view[key] = value[start : start + n].view(param.shape)
            elif key in _PER_BLOCK:
                view[key] = value[first_block : first_block + blocks]
            elif key in _SHARED:
                view[key] = value
            else:
                raise NotImplementedError(f"FlatAdamW8bit: cannot split the flat state's {key!r} per parameter")
        return view

    def state_dict(self) -> dict:
        """The state AdamW8bit would save for the same parameter groups (per parameter)."""
        live_groups, live_state = self.param_groups, self.state
        self.param_groups = [
            {**{k: v for k, v in group.items() if k != "params"}, "params": members}
            for group, members in zip(live_groups, self._group_members)
        ]
        self.state = {p: s for members in self._group_members for p in members if (s := self.parameter_state(p))}
        try:
            return super().state_dict()
        finally:
            self.param_groups, self.state = live_groups, live_state

    def load_state_dict(self, state_dict: dict, move_to_device: bool = True) -> None:
        """Loads what state_dict() returned, or what AdamW8bit saved for the same parameter groups."""
        saved_groups = state_dict["param_groups"]
        saved_sizes = [len(g["params"]) for g in saved_groups]
        sizes = [len(members) for members in self._group_members]
        if saved_sizes != sizes:
            raise ValueError(
                f"the optimizer state was saved for parameter groups of {saved_sizes} tensors; this optimizer "
                f"has {sizes}"
            )
        wrapper = self._FSDP_WRAPPED_QUANT_STATE_KEY
        saved = {}
        for group, members in zip(saved_groups, self._group_members):
            for index, p in zip(group["params"], members):
                entry = state_dict["state"].get(index)
                if entry:
                    entry = dict(entry)
                    entry.update(entry.pop(wrapper, {}))
                    saved[p] = entry
        live_state, live_groups, index = {}, [], 0
        for group, live in zip(saved_groups, self.param_groups):
            indices = []
            for p in live["params"]:
                entry = self._joined_state(self._buffer_of[p], saved) if p in self._buffer_of else saved.get(p)
                if entry:
                    live_state[index] = entry
                indices.append(index)
                index += 1
            live_groups.append({**group, "params": indices})
        super().load_state_dict({"state": live_state, "param_groups": live_groups}, move_to_device)

    def _joined_state(self, buffer: _FlatBuffer, saved: dict) -> dict | None:
        """The flat buffer's state made from its members' saved per-parameter entries."""
        entries = [saved.get(p) for p in buffer.members]
        have = sum(e is not None for e in entries)
        if have == 0:
            return None
        problem = None
        if have < len(entries):
            problem = f"{have} of the {len(entries)} tensors that share a flat buffer here have saved state"
        elif len({int(e["step"]) for e in entries}) > 1:
            steps = sorted({int(e["step"]) for e in entries})
            problem = f"tensors that share a flat buffer here were stepped {steps} times"
        elif any(set(e) != set(_STATE_ORDER) or e["state1"].dtype != torch.uint8 for e in entries):
            problem = "the saved state is not bitsandbytes' 8-bit AdamW state (32-bit moments, or other keys)"
        elif any(e[key].numel() != p.numel() for e, p in zip(entries, buffer.members) for key in _PER_ELEMENT):
            problem = "saved moments do not match the parameters' sizes"
        if problem:
            raise ValueError(
                f"cannot load this optimizer state into flat buffers: {problem}; resume with {FLAT_OPTIMIZER_ENV}=0"
            )
        first = entries[0]
        joined = {}
        for key in _STATE_ORDER:
            if key in _SHARED:
                joined[key] = first[key]
                continue
            # Pads restart from the code of exactly 0 in their moment's map.
            zero_code = int(first["qmap" + key[-1]].abs().argmin()) if key in _PER_ELEMENT else None
            pieces = []
            for e, pad in zip(entries, buffer.pads):
                pieces.append(e[key].reshape(-1))
                if zero_code is not None and pad is not None:
                    pieces.append(torch.full((pad.numel(),), zero_code, dtype=torch.uint8, device=e[key].device))
            joined[key] = torch.cat(pieces)
        return joined


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def _without_step_hooks(step):
    """`step` without the wrapper torch puts around an optimizer class's step (marked `hooked`)."""
    return step.__wrapped__ if getattr(step, "hooked", False) else step


_BLOCK: list[int] = []


def _quantisation_block() -> int:
    """Elements per block of bitsandbytes' 8-bit optimizer state, read from the state it allocates
    (256 since bitsandbytes 0.44)."""
    if not _BLOCK:
        n = 1 << 16
        probe = torch.nn.Parameter(torch.zeros(n))
        optimizer = bnb_optim.AdamW8bit([probe])
        optimizer.init_state(optimizer.param_groups[0], probe, 0, 0)
        _BLOCK.append(n // optimizer.state[probe]["absmax1"].numel())
    return _BLOCK[0]
