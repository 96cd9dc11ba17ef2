"""TRL's SFTTrainer with tuneforge's defaults: precision picked for the device, the 8-bit AdamW
with a separate embedding learning rate, the kernel-backed loss when the model has it, and
callbacks that leave a CSV log, a loss plot and a one-line summary in the output folder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import trl

from tuneforge.data.packing import padding_free_batch
from tuneforge.device import has_cuda, is_bfloat16_supported
from tuneforge.train.callbacks import CsvLogCallback, SummaryCallback
from tuneforge.train.checkpointing import keep_offloaded_checkpointing

logger = logging.getLogger(__name__)


@dataclass
class SFTConfig(trl.SFTConfig):
    """trl.SFTConfig plus `embedding_learning_rate` (for embed_tokens / lm_head when trained).

    Precision: leave `bf16`/`fp16` unset (None) to pick bf16 on Ampere+ GPUs, fp16 on older
    GPUs and fp32 on the CPU.
    """

    embedding_learning_rate: float | None = field(
        default=None, metadata={"help": "learning rate of embed_tokens / lm_head when they are trained"}
    )
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
        distributed.configure_arguments(self)
        super().__post_init__()
        distributed.finish_arguments(self)


class SFTTrainer(trl.SFTTrainer):
    """Drop-in for trl.SFTTrainer (same arguments)."""

    def __init__(self, model=None, args=None, *positional, callbacks=None, **kwargs):
        if args is None:
            args = SFTConfig(output_dir="outputs")
        if model is not None and not isinstance(model, str):
            keep_offloaded_checkpointing(model, args)
        callbacks = list(callbacks or [])
        if not any(isinstance(c, CsvLogCallback) for c in callbacks):
            callbacks.append(CsvLogCallback(args.output_dir))
        if not any(isinstance(c, SummaryCallback) for c in callbacks):
            callbacks.append(SummaryCallback(args.output_dir))
        super().__init__(model, args, *positional, callbacks=callbacks, **kwargs)
        if _attention_is_varlen(self.model):
            # Padded rows and TRL's packed rows both become one padding-free row with sample
            # boundaries, computed on the CPU in the collator: the patched attention runs the varlen
            # kernel on them, and no compute is spent on pad tokens (kernels/varlen_attention.py).
            self.data_collator = PaddingFreeBatches(self.data_collator)
            logger.info("batches go padding-free (varlen attention): pads dropped, samples kept apart")
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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not _has_fused_loss(model) or return_outputs:
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
            # A host int where the batch allows it: `.item()` on a device tensor every step would
            # stop the CPU from queueing the next kernels until the GPU caught up.
            if "attention_mask" in inputs:
                tokens = inputs["attention_mask"].sum()
            else:
                tokens = inputs["input_ids"].numel()
            if self.accelerator.num_processes > 1:
                tokens = self.accelerator.gather_for_metrics(
                    torch.as_tensor(tokens, device=inputs["input_ids"].device)).sum()
            self._total_train_tokens += int(tokens)
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return loss


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
    """Wraps a collator: each batch it makes goes through `padding_free_batch` (data/packing.py)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        return padding_free_batch(self.collator(features))


def _attention_is_varlen(model) -> bool:
    """Whether the model's attention is tuneforge's patched one, which reads cu_seq_lens."""
    return "varlen" in getattr(_base_model(model), "tuneforge_kernels", [])


def _has_fused_loss(model) -> bool:
    return "fused_cross_entropy" in getattr(_base_model(model), "tuneforge_kernels", [])


def _base_model(model):
    base = model
    while hasattr(base, "get_base_model"):
        base = base.get_base_model()
    return getattr(base, "module", base)  # DDP
