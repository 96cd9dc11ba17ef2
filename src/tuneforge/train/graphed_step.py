"""Training micro-steps (forward with labels + backward) replayed from CUDA graphs, one per batch shape.

Why: on fixed shapes the step is bound by the CPU issuing kernels, not by the GPU running them
(bench/README.md: ~4,000 kernels a step on Llama-3.2-1B, ~60 us of CPU each, the GPU idle between).
A captured graph issues the whole forward and backward with one call.

What is captured: the loss (by default `model(**batch).loss` under autocast) and its backward. What
is not: the optimizer step (its learning rate and step count are host numbers that change every
step and would be frozen into a graph), gradient clipping, zeroing. So any optimizer and scheduler
work unchanged.

The contract, and why each part holds:
  - A batch is replayed by the graph captured for its signature (keys, tensor shapes and dtypes,
    the values of non-tensor entries); a new signature is captured on first sight, up to
    `max_graphs`. Padding-free batches get few signatures through data.packing.pad_to_budget.
    All graphs share one memory pool: they never run at the same time.
  - The trainable parameters' gradients are views into one buffer per dtype, shared by all
    graphs, and a replay ADDS into them. Gradients follow autograd's rule: where `.grad` was set
    to None since the last step (optimizer.zero_grad()), the step starts from zero (one memset per
    buffer) and the views go back into `.grad`; where `.grad` is still there (gradient
    accumulation, or zero_grad(set_to_none=False)), the step adds to it.
  - Parameters must keep their storage (the graphs read fixed addresses): checked at every step.
  - Labels are range-checked on the host before each replay (the loss kernel's own check syncs,
    which a capture forbids).
  - LoRA weights cast to bf16 are rebuilt inside the graph (kernels/weight_cache.py keeps nothing
    while capturing), so replays after an optimizer step see the new weights.
  - Offloaded checkpointing keeps one set of page-locked host buffers per graph.
  - Models with active dropout are refused: checkpointed recomputation would need the RNG state
    replayed, which is read on the host.
Equality with the eager step (loss and every gradient, over steps with optimizer updates between,
with accumulation, with padding-free batches of several shapes) is tested on the GPU in
tests/train/test_graphed_step.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from tuneforge.kernels.cross_entropy import check_labels
from tuneforge.patch.activation_checkpointing import layer_input_offloader

logger = logging.getLogger(__name__)


class GraphUnsupported(RuntimeError):
    """This model or batch cannot be captured; the message says why (the caller stays eager)."""


def unsupported_reason(model: torch.nn.Module, batch: dict) -> str | None:
    """Why `model` cannot run `batch` as a graphed step, or None when it can."""
    if "labels" not in batch:
        return "the batch has no labels (the graphed step computes the loss)"
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0 and module.training:
            return f"dropout p={module.p} in {name or 'the model'} (recomputation would need the RNG replayed)"
    if not any(p.requires_grad for p in model.parameters()):
        return "no trainable parameters"
    if any(torch.is_tensor(v) and v.device.type != "cuda" for v in batch.values()):
        return "the batch is not on a CUDA device"
    return None


def signature(batch: dict) -> tuple:
    """What a captured graph fixes about a batch: keys, tensor shapes and dtypes, other values."""
    return tuple(sorted((k, (tuple(v.shape), v.dtype) if torch.is_tensor(v) else ("value", v))
                        for k, v in batch.items()))


class _Gradients:
    """The trainable parameters' gradients as views into one buffer per dtype."""

    def __init__(self, params: list[torch.nn.Parameter], device: torch.device) -> None:
        self.params = params
        self.addresses = [p.data_ptr() for p in params]
        # One memset per dtype to zero them (LoRA weights are fp32 from peft, bf16 after TRL's cast).
        sizes: dict[torch.dtype, int] = {}
        for p in params:
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
        self.buffers = [torch.zeros(n, dtype=dtype, device=device) for dtype, n in sizes.items()]
        by_dtype = dict(zip(sizes, self.buffers))
        offsets = dict.fromkeys(sizes, 0)
        self.views = []
        for p in params:
            start = offsets[p.dtype]
            offsets[p.dtype] = start + p.numel()
            self.views.append(by_dtype[p.dtype][start:start + p.numel()].view_as(p))

    def zero(self) -> None:
        for buffer in self.buffers:
            buffer.zero_()

    def attach(self) -> None:
        for p, g in zip(self.params, self.views):
            if p.grad is not g:
                p.grad = g

    def prepare(self) -> None:
        """Before a replay, by autograd's rule: all cleared (None) -> start from zero; otherwise
        add to what is there (a gradient set elsewhere is copied into its view, None counts as 0)."""
        for p, address in zip(self.params, self.addresses):
            if p.data_ptr() != address:
                raise GraphUnsupported("a trainable parameter moved since capture (an optimizer or .to() replaced "
                                       "its storage); capture again")
        if all(p.grad is None for p in self.params):
            self.zero()
        else:
            for p, g in zip(self.params, self.views):
                if p.grad is g:
                    continue
                if p.grad is None:
                    g.zero_()
                # zero_grad(set_to_none=False) may hand back `grad.detach().zero_()`: a new tensor
                # object on the view's own memory, nothing to copy.
                elif p.grad.data_ptr() != g.data_ptr():
                    g.copy_(p.grad)
        self.attach()


class _Captured:
    """One batch signature's graph: its static inputs and its loss."""

    def __init__(self, static: dict, graph: torch.cuda.CUDAGraph, loss: torch.Tensor, seconds: float) -> None:
        self.static, self.graph, self.loss, self.seconds = static, graph, loss, seconds


class GraphedStep:
    """`step(batch) -> loss`: forward + backward of `model` replayed from CUDA graphs.

    model: a training-mode model (tuneforge-patched or not).
    loss_fn: `loss_fn(batch) -> loss` run eagerly for warm-up and under capture; default
             `model(**batch).loss` under autocast(dtype). Batch entries the model does not take
             (a loss scale, a token count) can ride along as tensors for loss_fn to pop.
    dtype: the default loss_fn's autocast dtype (bf16 / fp16), or None for no autocast.
    warmup: eager passes on a side stream before each capture (lazy initialisation, Triton
            compilation, cuBLAS workspaces must happen outside the capture).
    max_graphs: batch signatures captured at most; another raises GraphUnsupported.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[dict], torch.Tensor] | None = None,
                 dtype: torch.dtype | None = torch.bfloat16, warmup: int = 2, max_graphs: int = 8) -> None:
        self.model = model
        self.dtype = dtype
        self.loss_fn = loss_fn or self._model_loss
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.gradients: _Gradients | None = None
        self.captured: dict[tuple, _Captured] = {}
        self.pool = None
        self.offloader = layer_input_offloader(model)  # None without offloaded checkpointing

    @property
    def capture_seconds(self) -> float:
        return sum(c.seconds for c in self.captured.values())

    def _model_loss(self, batch: dict) -> torch.Tensor:
        if self.dtype is None:
            return self.model(**batch).loss
        with torch.autocast("cuda", dtype=self.dtype, cache_enabled=False):
            return self.model(**batch).loss

    def _pass(self, key, static: dict) -> torch.Tensor:
        if self.offloader is not None:
            self.offloader.use_static_buffers(key)
        loss = self.loss_fn(dict(static))
        loss.backward()
        return loss.detach()

    def _capture(self, key, batch: dict) -> _Captured:
        reason = unsupported_reason(self.model, batch)
        if reason is not None:
            raise GraphUnsupported(reason)
        if len(self.captured) >= self.max_graphs:
            raise GraphUnsupported(f"more than {self.max_graphs} batch shapes; pad batches to fewer shapes "
                                   "(data.packing.pad_to_budget)")
        started = time.perf_counter()
        device = batch["labels"].device
        if self.gradients is None:
            self.gradients = _Gradients(self.params, device)
            self.pool = torch.cuda.graph_pool_handle()
        # Warm-up and capture add into the shared gradients: keep what the caller has there now.
        self.gradients.prepare()
        saved = [buffer.clone() for buffer in self.gradients.buffers]
        static = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self._pass(key, static)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                loss = self._pass(key, static)
        except Exception as error:  # noqa: BLE001 - whatever breaks the capture, the step can run eagerly
            raise GraphUnsupported(f"capture failed ({type(error).__name__}: {str(error)[:300]})") from error
        finally:
            if self.offloader is not None:
                self.offloader.use_pinned_pool()
            for buffer, kept in zip(self.gradients.buffers, saved):
                buffer.copy_(kept)
        torch.cuda.synchronize(device)
        captured = self.captured[key] = _Captured(static, graph, loss, time.perf_counter() - started)
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in batch.items() if torch.is_tensor(v) and v.dim())
        logger.info("graphed step: captured forward + backward for %s in %.1f s (graph %d of at most %d)",
                    shapes, captured.seconds, len(self.captured), self.max_graphs)
        return captured

    def step(self, batch: dict) -> torch.Tensor:
        """Run forward + backward on `batch`, accumulating gradients as `loss.backward()` would;
        returns the loss (a tensor the next step with the same shapes overwrites)."""
        key = signature(batch)
        captured = self.captured.get(key)
        if captured is None:
            captured = self._capture(key, batch)
        check_labels(batch["labels"], self.vocab)
        for k, v in batch.items():
            if torch.is_tensor(v):
                captured.static[k].copy_(v, non_blocking=True)
        self.gradients.prepare()
        captured.graph.replay()
        return captured.loss

    def release(self) -> None:
        """Free the graphs and the offload buffers (the model goes back to eager steps)."""
        if self.offloader is not None:
            self.offloader.release_static_buffers()
        for captured in self.captured.values():
            captured.graph.reset()
        self.captured.clear()
        self.gradients = None  # its views stay in the parameters' .grad until the next zero_grad
        self.pool = None

