"""One training micro-step (forward with labels + backward) of a fixed-shape batch, as a CUDA graph.

Why: on fixed shapes the step is bound by the CPU issuing kernels, not by the GPU running them
(bench/README.md: ~4,000 kernels a step on Llama-3.2-1B, ~60 us of CPU each, the GPU idle between).
A captured graph issues the whole forward and backward with one call.

What is captured: `model(**batch).loss` under autocast and `loss.backward()`. What is not: the
optimizer step (its learning rate and step count are host numbers that change every step and would
be frozen into a graph), gradient clipping, zeroing. So any optimizer and scheduler work unchanged.

The contract, and why each part holds:
  - Every batch has the shapes and dtypes of the first; its tensors are copied into the graph's
    static inputs. Another shape raises (the caller keeps an eager path for it).
  - The trainable parameters' gradients are views into one fp32 buffer owned here. A replay ADDS
    into them, as backward does; `step(batch)` zeroes the buffer first (one memset) unless
    `accumulate=True`. An optimizer that sets `.grad = None` gets the views back at the next call.
  - Parameters must keep their storage (the graph reads fixed addresses): checked at every call.
  - Labels are range-checked on the host before each replay (the loss kernel's own check syncs,
    which a capture forbids).
  - LoRA weights cast to bf16 are rebuilt inside the graph (kernels/weight_cache.py keeps nothing
    while capturing), so replays after an optimizer step see the new weights.
  - Offloaded checkpointing keeps one set of page-locked host buffers that every replay reuses.
  - Models with active dropout are refused: checkpointed recomputation would need the RNG state
    replayed, which is read on the host.
Equality with the eager step (loss and every gradient, over steps with optimizer updates between)
is tested on the GPU in tests/train/test_graphed_step.py.
"""

from __future__ import annotations

import functools
import logging
import time

import torch

from tuneforge.kernels.cross_entropy import check_labels
from tuneforge.patch.activation_checkpointing import LayerInputOffloader, offloaded_checkpoint

logger = logging.getLogger(__name__)


class GraphUnsupported(RuntimeError):
    """This model or batch cannot be captured; the message says why (the caller stays eager)."""


def unsupported_reason(model: torch.nn.Module, batch: dict) -> str | None:
    """Why `model` cannot run `batch` as a graphed step, or None when it can."""
    if "labels" not in batch:
        return "the batch has no labels (the graphed step computes the loss)"
    if any(k in batch for k in ("cu_seq_lens_q", "cu_seq_lens_k", "position_ids")):
        return "padding-free (packed) batches change their sample boundaries every step"
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0 and module.training:
            return f"dropout p={module.p} in {name or 'the model'} (recomputation would need the RNG replayed)"
    if not any(p.requires_grad for p in model.parameters()):
        return "no trainable parameters"
    if any(torch.is_tensor(v) and v.device.type != "cuda" for v in batch.values()):
        return "the batch is not on a CUDA device"
    return None


class GraphedStep:
    """`step(batch) -> loss`: forward + backward of `model` replayed from a CUDA graph.

    model: a training-mode model (tuneforge-patched or not) whose forward returns `.loss`.
    example: a batch dict of CUDA tensors (input_ids, labels, optionally attention_mask) fixing
             the shapes; it is also the batch the capture runs on.
    dtype: the autocast dtype (bf16 / fp16), or None for no autocast.
    warmup: eager passes on a side stream before capture (lazy initialisation, Triton compilation,
            cuBLAS workspaces must happen outside the capture).
    """

    def __init__(self, model: torch.nn.Module, example: dict, dtype: torch.dtype | None = torch.bfloat16,
                 warmup: int = 2) -> None:
        reason = unsupported_reason(model, example)
        if reason is not None:
            raise GraphUnsupported(reason)
        started = time.perf_counter()
        self.model = model
        self.dtype = dtype
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self.static = {k: v.clone() if torch.is_tensor(v) else v for k, v in example.items()}
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.addresses = [p.data_ptr() for p in self.params]
        device = self.static["input_ids"].device
        self.flat_grad = torch.zeros(sum(p.numel() for p in self.params), dtype=torch.float32, device=device)
        self.grads = []
        offset = 0
        for p in self.params:
            # One buffer in the parameter's dtype would be better for fp16/bf16 parameters; LoRA
            # parameters are fp32 (peft's default), and a different dtype gets its own tensor.
            if p.dtype == torch.float32:
                view = self.flat_grad[offset:offset + p.numel()].view_as(p)
            else:
                view = torch.zeros_like(p)
            offset += p.numel()
            self.grads.append(view)
        self._attach_grads()
        self.offloaders = _offloaders(model)
        for offloader in self.offloaders:
            offloader.keep_static_buffers()

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._forward_backward()
        torch.cuda.current_stream(device).wait_stream(side)
        self._zero_grads()
        torch.cuda.synchronize(device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self._forward_backward()
        torch.cuda.synchronize(device)
        self.capture_seconds = time.perf_counter() - started
        logger.info("graphed step: forward + backward captured for batch %s in %.1f s (%d trainable tensors, "
                    "%d offloaded layer inputs)", tuple(self.static["input_ids"].shape), self.capture_seconds,
                    len(self.params), sum(len(o._static or ()) for o in self.offloaders))

    def _forward_backward(self) -> torch.Tensor:
        for offloader in self.offloaders:
            offloader.restart_pass()
        kwargs = {k: v for k, v in self.static.items()}
        if self.dtype is not None:
            with torch.autocast("cuda", dtype=self.dtype, cache_enabled=False):
                loss = self.model(**kwargs).loss
        else:
            loss = self.model(**kwargs).loss
        loss.backward()
        return loss.detach()

    def _zero_grads(self) -> None:
        self.flat_grad.zero_()
        for g in self.grads:
            if g.dtype != torch.float32:
                g.zero_()

    def _attach_grads(self) -> None:
        for p, g in zip(self.params, self.grads):
            if p.grad is not g:
                p.grad = g

    def matches(self, batch: dict) -> bool:
        """Whether `batch` has the captured keys, shapes and dtypes."""
        if batch.keys() != self.static.keys():
            return False
        return all(not torch.is_tensor(v) or (v.shape == self.static[k].shape and v.dtype == self.static[k].dtype)
                   for k, v in batch.items())

    def step(self, batch: dict, accumulate: bool = False) -> torch.Tensor:
        """Run forward + backward on `batch`; returns the loss (a tensor overwritten by the next call).

        accumulate: add to the gradients already there instead of replacing them (gradient
        accumulation over micro-batches)."""
        if not self.matches(batch):
            raise GraphUnsupported(
                "batch differs from the captured one: "
                + ", ".join(f"{k} {tuple(v.shape)}" for k, v in batch.items() if torch.is_tensor(v)))
        for p, address in zip(self.params, self.addresses):
            if p.data_ptr() != address:
                raise GraphUnsupported("a trainable parameter moved since capture (an optimizer or .to() replaced "
                                       "its storage); capture again")
        check_labels(batch["labels"], self.vocab)
        for k, v in batch.items():
            if torch.is_tensor(v):
                self.static[k].copy_(v, non_blocking=True)
        if not accumulate:
            self._zero_grads()
        self._attach_grads()
        self.graph.replay()
        return self.loss

    def release(self) -> None:
        """Free the graph and the offload buffers (the model goes back to eager steps)."""
        for offloader in self.offloaders:
            offloader.release_static_buffers()
        self.graph.reset()


def _offloaders(model: torch.nn.Module) -> list[LayerInputOffloader]:
    found = []
    for module in model.modules():
        run = getattr(module, "_gradient_checkpointing_func", None)
        if isinstance(run, functools.partial) and run.func is offloaded_checkpoint:
            offloader = run.keywords["offloader"]
            if all(offloader is not o for o in found):
                found.append(offloader)
    return found
