"""TRL's SFTTrainer with tuneforge's defaults: precision picked for the device, the 8-bit AdamW
with a separate embedding learning rate, the kernel-backed loss when the model has it, and
callbacks that leave a CSV log, a loss plot and a one-line summary in the output folder.
"""

from __future__ import annotations

import functools
import gc
import logging
from dataclasses import dataclass, field

import torch
import trl

from tuneforge.data.packing import pad_to_budget, padding_free_batch
from tuneforge.device import has_cuda, is_bfloat16_supported
from tuneforge.models.record import record_of
from tuneforge.patch.activation_checkpointing import keep_offloaded_checkpointing
from tuneforge.train.callbacks import CsvLogCallback, SummaryCallback
from tuneforge.train.graphed_step import GraphedStep, GraphUnsupported

logger = logging.getLogger(__name__)


@dataclass
class SFTConfig(trl.SFTConfig):
    """trl.SFTConfig plus `embedding_learning_rate` (for embed_tokens / lm_head when trained), and
    Unsloth's notebook arguments.

    Precision: leave `bf16`/`fp16` unset (None) to pick bf16 on Ampere+ GPUs, fp16 on older
    GPUs and fp32 on the CPU. On a machine without CUDA, `fp16=True` (and `bf16=True` without
    `use_cpu=True`) -- what the notebooks' `fp16=not is_bfloat16_supported()` gives there -- trains
    in fp32, with a log line (transformers would refuse them).
    max_seq_length: Unsloth's (and older trl's) name for `max_length`.
    max_length: None (default) takes the model's `max_seq_length` (set by
        `FastLanguageModel.from_pretrained`) in SFTTrainer, as Unsloth does; a model without one
        gets no truncation.
    """

    embedding_learning_rate: float | None = field(
        default=None, metadata={"help": "learning rate of embed_tokens / lm_head when they are trained"}
    )
    max_seq_length: int | None = field(default=None, metadata={"help": "Unsloth's name for max_length"})
    max_length: int | None = None
    # get_peft_model already set up checkpointing (possibly offloaded); the trainer must not
    # re-enable the standard one over it.
    gradient_checkpointing: bool = False
    logging_steps: float = 1
    fp16: bool | None = None
    report_to: None | str | list[str] = None

    def __post_init__(self):
        from tuneforge.train import distributed

        if self.bf16 is None:
            self.bf16 = is_bfloat16_supported()
        if self.fp16 is None:
            self.fp16 = has_cuda() and not self.bf16
        if self.report_to is None:
            self.report_to = "none"
        if self.max_seq_length is not None:
            if self.max_length is not None and self.max_length != self.max_seq_length:
                raise ValueError(f"SFTConfig: max_seq_length={self.max_seq_length} and max_length={self.max_length} "
                                 "disagree; max_seq_length is the older name of max_length, pass one of them")
            self.max_length = self.max_seq_length
        distributed.configure_arguments(self)
        _precision_for_cpu(self)
        super().__post_init__()
        distributed.finish_arguments(self)
        self.max_seq_length = self.max_length


def _precision_for_cpu(args) -> None:
    """fp16 / bf16 asked for on a machine without CUDA: fp32 instead, said in a log line."""
    if has_cuda():
        return
    if args.fp16:
        logger.warning("fp16=True but there is no CUDA GPU: training in fp32 on the CPU (fp16 mixed precision "
                       "needs a GPU)")
        args.fp16 = False
    if args.bf16 and not args.use_cpu:
        logger.warning("bf16=True but there is no CUDA GPU: training in fp32 on the CPU (pass use_cpu=True to "
                       "train under bf16 autocast on the CPU, ~20x slower with 4-bit weights)")
        args.bf16 = False


# Arguments that older trl took in SFTTrainer(...) and Unsloth's notebooks still pass there; trl now
# reads them from SFTConfig, so they move into `args` (max_seq_length under its new name, max_length).
TRAINER_LEVEL_CONFIG = ("dataset_text_field", "max_seq_length", "packing", "dataset_num_proc", "dataset_kwargs",
                        "neftune_noise_alpha", "eos_token", "padding_free", "packing_strategy",
                        "completion_only_loss", "assistant_only_loss", "model_init_kwargs")
# Arguments older trl took that it no longer has, and what to do instead.
_REMOVED = {
    "dataset_batch_size": "trl tokenizes with datasets' default batch size now; remove it",
    "num_of_sequences": "packing is exact now (packing=True); remove it",
    "chars_per_token": "packing is exact now (packing=True); remove it",
    "infinite": "remove it (set max_steps or num_train_epochs)",
}


def as_sft_config(args) -> SFTConfig:
    """`args` as tuneforge's SFTConfig: None -> defaults (output_dir "outputs"); a transformers
    TrainingArguments or trl.SFTConfig (what the notebooks import) -> the same values in ours, so
    the device-dependent precision and the model's max_seq_length apply."""
    from dataclasses import fields

    if args is None:
        return SFTConfig(output_dir="outputs")
    if isinstance(args, SFTConfig):
        return args
    ours = {f.name for f in fields(SFTConfig) if f.init}
    values = {f.name: getattr(args, f.name) for f in fields(args) if f.init and f.name in ours}
    if not isinstance(args, trl.SFTConfig):
        values.pop("max_length", None)  # TrainingArguments has none; SFTConfig's default applies
    logger.info("SFTTrainer: %s converted to tuneforge.SFTConfig", type(args).__name__)
    return SFTConfig(**values)


def _arguments_into_config(args: SFTConfig, moved: dict) -> None:
    for name, value in moved.items():
        target = "max_length" if name == "max_seq_length" else name
        logger.info("SFTTrainer(%s=%r): moved into SFTConfig.%s (trl reads it there now)", name, value, target)
        setattr(args, target, value)
        if target == "max_length":
            args.max_seq_length = value


class SFTTrainer(trl.SFTTrainer):
    """Drop-in for trl.SFTTrainer (same arguments), also taking Unsloth's notebook arguments.

    tokenizer: the older name of `processing_class`.
    dataset_text_field, max_seq_length, packing, dataset_num_proc, ... (TRAINER_LEVEL_CONFIG):
        older trl's trainer-level arguments, moved into `args` with a log line.
    args: a tuneforge SFTConfig, or a trl SFTConfig / transformers TrainingArguments (converted).
    The model's `max_seq_length` is the truncation length unless `args` sets max_length.
    """

    def __init__(self, model=None, args=None, *positional, callbacks=None, tokenizer=None, **kwargs):
        removed = sorted(name for name in kwargs if name in _REMOVED)
        if removed:
            raise TypeError("SFTTrainer: " + "; ".join(f"{name} is no longer a trl argument: {_REMOVED[name]}"
                                                         for name in removed))
        args = as_sft_config(args)
        _arguments_into_config(args, {name: kwargs.pop(name) for name in TRAINER_LEVEL_CONFIG if name in kwargs})
        if tokenizer is not None:
            if kwargs.get("processing_class") not in (None, tokenizer):
                raise ValueError("SFTTrainer: tokenizer= and processing_class= name two different tokenizers; "
                                 "tokenizer is the older name of processing_class, pass one")
            kwargs["processing_class"] = tokenizer
        if args.max_length is None and getattr(model, "max_seq_length", None):
            args.max_length = args.max_seq_length = int(model.max_seq_length)
            logger.info("SFTTrainer: max_length = the model's max_seq_length, %d", args.max_length)
        if model is not None and not isinstance(model, str):
            keep_offloaded_checkpointing(model, args)
            from tuneforge.integration.bnb import prevent_cpu_repack

            # A model that generated on an AVX512-BF16 CPU (for_inference) is back in bitsandbytes'
            # standard layout before anything (FSDP2, the fused kernels) reads it, and stays so.
            prevent_cpu_repack(model)
        callbacks = list(callbacks or [])
        if not any(isinstance(c, CsvLogCallback) for c in callbacks):
            callbacks.append(CsvLogCallback(args.output_dir))
        if not any(isinstance(c, SummaryCallback) for c in callbacks):
            callbacks.append(SummaryCallback(args.output_dir))
        super().__init__(model, args, *positional, callbacks=callbacks, **kwargs)
        # Chosen once: the patched forward computes the loss itself (chunked, no logits) or it does not.
        self._fused_loss = _has_fused_loss(self.model)
        self._graphs = self._graphs_wanted()
        self._graphed: GraphedStep | None = None
        self._real_tokens: int | None = None
        if _attention_is_varlen(self.model):
            # Padded rows and TRL's packed rows both become one padding-free row with sample
            # boundaries, computed on the CPU in the collator: the patched attention runs the varlen
            # kernel on them, and no compute is spent on pad tokens (kernels/varlen_attention.py).
            # With CUDA graphs the row is then padded to a few fixed shapes (a filler sample).
            self.data_collator = PaddingFreeBatches(self.data_collator, self.args.max_length if self._graphs else None)
            logger.info("batches go padding-free (varlen attention): pads dropped, samples kept apart%s",
                        f"; padded to multiples of {self.args.max_length} tokens for CUDA graphs" if self._graphs else "")
        if not has_cuda():
            _adapters_to_fp32(self.model)
        # Resuming through peft upcasts adapter weights to fp32; training must go on in the dtypes
        # it started with (bf16 QLoRA adapters on GPUs) or a resumed run drifts from an unbroken one.
        self._trainable_dtypes = {n: p.dtype for n, p in self.model.named_parameters() if p.requires_grad}

    def _load_from_checkpoint(self, *args, **kwargs):
        super()._load_from_checkpoint(*args, **kwargs)
        for name, parameter in self.model.named_parameters():
            dtype = self._trainable_dtypes.get(name)
            if dtype is not None and parameter.dtype != dtype:
                parameter.data = parameter.data.to(dtype)  # exact: the values were bf16 to begin with

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        # accelerate runs FSDP only on accelerators; CPU (gloo) jobs that ask for it get it here.
        from tuneforge.train.distributed import enable_fsdp_on_cpu

        enable_fsdp_on_cpu(self)

    def create_optimizer(self, *args, **kwargs):
        # Our table (8-bit AdamW, embedding learning rate); names outside it go to transformers.
        if self.optimizer is None:
            from tuneforge.train.optim import create_optimizer_for_trainer

            self.optimizer = create_optimizer_for_trainer(self)
        return super().create_optimizer(*args, **kwargs)

    def train(self, *args, **kwargs):
        # Everything alive now (model, data, libraries) lives through the run: moved out of the
        # collector's reach, so its full collections stop rescanning it between steps.
        gc.collect()
        gc.freeze()
        try:
            return super().train(*args, **kwargs)
        finally:
            gc.unfreeze()
            if self._graphed is not None:
                # The graphs' memory pool and page-locked buffers go back: the model may generate
                # next (one process alternating training and generation), and train() captures again.
                self._graphed.release()
                self._graphed = None

    def _graphs_wanted(self) -> bool:
        """CUDA-graph steps (TUNEFORGE_CUDA_GRAPHS=1): only where every step can be captured the same
        way. Decided once; the reason it is not used is logged."""
        if not record_of(_base_model(self.model)).switches.cuda_graphs:
            return False
        args = self.args
        why = None
        if not has_cuda():
            why = "no CUDA device"
        elif not self._fused_loss:
            why = "the model's loss is not tuneforge's fused one"
        elif args.fp16:
            why = "fp16 (the gradient scaler decides on the host whether to step)"
        elif args.world_size > 1:
            why = "more than one process"
        elif args.max_length is None:
            why = "no max_length to pad batches to"
        elif not _attention_is_varlen(self.model):
            why = "the attention does not take padding-free batches, so batch shapes vary"
        elif not getattr(args, "packing", False):
            # Unpacked batches hold anywhere from one max_length of tokens to batch-size of them:
            # padding them to a few shapes would compute a large share of filler.
            why = "packing=False (batch sizes vary too much to pad to a few shapes)"
        if why:
            logger.warning("TUNEFORGE_CUDA_GRAPHS=1 but training steps run eagerly: %s", why)
            return False
        logger.info("training steps replay CUDA graphs (one per batch shape; train/graphed_step.py)")
        return True

    def _prepare_inputs(self, inputs):
        # PaddingFreeBatches' count of real tokens (the filler sample is not trained on) rides in
        # the batch; it is not a model input.
        if isinstance(inputs, dict) and "num_real_tokens" in inputs:
            self._real_tokens = inputs.pop("num_real_tokens")
        return super()._prepare_inputs(inputs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self._graphs:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = self._prepare_inputs(inputs)
        if self._graphed is None:
            self._graphed = GraphedStep(model, loss_fn=functools.partial(_graphed_loss, model), dtype=None)
        batch = dict(inputs, use_cache=False)
        device = batch["input_ids"].device
        # As Trainer.training_step scales (transformers 5.17-5.23 name these differently).
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        scale = 1.0 if scaled else 1.0 / steps
        # 0-d, like the loss: the Trainer adds the returned loss into its 0-d running total.
        batch["loss_scale"] = torch.tensor(scale, dtype=torch.float32, device=device)
        if num_items_in_batch is not None:
            batch["num_items_in_batch"] = torch.as_tensor(num_items_in_batch, dtype=torch.float32,
                                                          device=device).reshape(1)
        try:
            loss = self._graphed.step(batch)
        except GraphUnsupported as why:
            logger.warning("CUDA graphs off for the rest of the run: %s", why)
            self._graphs = False
            self._graphed.release()
            return super().training_step(model, inputs, num_items_in_batch)
        self._count_train_tokens(inputs)
        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return loss.clone()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._fused_loss or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Kernel-backed path: the patched forward computes the loss from hidden states in chunks
        # (the [tokens x vocab] logits never exist) and returns logits=None.
        mode = "train" if model.training else "eval"
        inputs["use_cache"] = False
        outputs = model(**inputs, num_items_in_batch=num_items_in_batch)
        loss = outputs.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # Same scaling as trl/transformers: DDP averages gradients over ranks.
            loss = loss * self.accelerator.num_processes
        if mode == "train":
            self._count_train_tokens(inputs)
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return loss

    def _count_train_tokens(self, inputs) -> None:
        """Add this batch's tokens (all processes') to the run's count."""
        # A host int where the batch allows it: `.item()` on a device tensor every step would
        # stop the CPU from queueing the next kernels until the GPU caught up.
        if self._real_tokens is not None:  # padded to a budget: the filler is not counted
            tokens = self._real_tokens
        elif "attention_mask" in inputs:
            tokens = inputs["attention_mask"].sum()
        else:
            tokens = inputs["input_ids"].numel()
        if self.accelerator.num_processes > 1:
            tokens = self.accelerator.gather_for_metrics(
                torch.as_tensor(tokens, device=inputs["input_ids"].device)).sum()
        self._total_train_tokens += int(tokens)


def unsloth_train(trainer, *args, **kwargs):
    """Unsloth's `unsloth_train(trainer)` (its gradient-accumulation fix, in transformers since 4.46):
    `trainer.train(...)`."""
    return trainer.train(*args, **kwargs)


def _adapters_to_fp32(model) -> None:
    """TRL casts QLoRA adapters to bf16 (the QLoRA paper's GPU recipe). On a CPU, bf16 matmuls run
    many times slower than fp32 ones, so the adapters go back to fp32 there (logged)."""
    cast = 0
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and parameter.dtype == torch.bfloat16:
            parameter.data = parameter.data.float()
            cast += 1
    if cast:
        logger.info("CPU run: %d trainable tensors kept in fp32 (TRL had cast them to bf16)", cast)


class PaddingFreeBatches:
    """Wraps a collator: each batch it makes goes through `padding_free_batch` (data/packing.py),
    then, given `longest`, through `pad_to_budget` (with `num_real_tokens`, the tokens before it)."""

    def __init__(self, collator, longest: int | None = None):
        self.collator = collator
        self.longest = longest

    def __call__(self, features):
        batch = padding_free_batch(self.collator(features))
        if self.longest is None or "cu_seq_lens_q" not in batch:
            return batch
        real = batch["input_ids"].shape[1]
        return dict(pad_to_budget(batch, self.longest), num_real_tokens=real)


def _graphed_loss(model, batch: dict) -> torch.Tensor:
    """The loss a graphed trainer step captures: the fused loss, scaled for gradient accumulation
    by a tensor the step fills in (the scale of the last, shorter accumulation window differs)."""
    scale = batch.pop("loss_scale")
    return model(**batch).loss * scale


def _attention_is_varlen(model) -> bool:
    """Whether the model's attention is tuneforge's patched one, which reads cu_seq_lens."""
    return "varlen" in record_of(_base_model(model)).kernels


def _has_fused_loss(model) -> bool:
    return "fused_cross_entropy" in record_of(_base_model(model)).kernels


def _base_model(model):
    base = model
    while hasattr(base, "get_base_model"):
        base = base.get_base_model()
    return getattr(base, "module", base)  # DDP
