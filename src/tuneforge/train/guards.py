"""Stop training at the first non-finite loss or gradient, before the optimiser applies it.

A NaN reaches the weights through one optimiser step and then spreads to every later step and
checkpoint; transformers by default only hides it from the log (`logging_nan_inf_filter`). The
guard checks each optimiser step just before `optimizer.step()`: the loss of every micro-batch
that fed it and every trainable parameter's gradient. On the first bad one it raises
`NonFiniteError` naming the step and the last checkpoint saved, which is finite because no bad
update was ever applied before it.

Cost: one device-to-host sync per optimiser step (the Trainer syncs on the loss anyway).
Under fp16 with loss scaling, overflowing gradients are expected (the scaler skips those steps and
lowers the scale), so only the loss is checked there.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from pathlib import Path

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training stopped on a NaN/inf loss or gradient. `.step` is the optimiser step that had it."""

    def __init__(self, message: str, step: int, checkpoint: Path | None):
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


def _describe(values: torch.Tensor) -> str:
    return "nan" if torch.isnan(values).any() else "inf"


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly FSDP2-sharded, DTensor) tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class NonFiniteGuard(TrainerCallback):
    """Raises NonFiniteError at the first optimiser step whose loss or gradients are not finite.

    The loss comes from a forward hook on the model (outputs.loss, training mode only), so the
    check does not depend on which loss path (transformers, TRL, fused kernel) produced it.
    """

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)
        self.losses: list[torch.Tensor] = []
        self.names: dict[int, str] = {}
        self.hook = None
        self.check_gradients = True

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.names = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.check_gradients = not args.fp16
        if not self.check_gradients:
            logger.info("non-finite guard: fp16 loss scaling skips overflowing steps itself; checking the loss only")
        if self.hook is None:
            self.hook = model.register_forward_hook(self._record_loss)

    def _record_loss(self, module, inputs, outputs):
        loss = getattr(outputs, "loss", None)
        if module.training and loss is not None:
            self.losses.append(loss.detach())

    def on_step_begin(self, args, state, control, **kwargs):
        self.losses.clear()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        step = state.global_step + 1
        losses = torch.stack([loss.float().reshape(()) for loss in self.losses]) if self.losses else None
        grads = [p.grad for p in self.params if p.grad is not None] if self.check_gradients else []
        flags = [torch.isfinite(losses).all()] if losses is not None else []
        flags += [torch.isfinite(_local(g)).all() for g in grads]
        finite = torch.stack(flags).all() if flags else None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank must stop together (one rank alone would hang the others in a collective),
            # and under FSDP2 each rank only sees its shard of a gradient.
            finite = torch.tensor(True) if finite is None else finite
            flag = finite.to(torch.int32).reshape(1)
            if flag.device.type == "cpu" and torch.distributed.get_backend() == "nccl":
                flag = flag.cuda()
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            finite = flag.bool().all()
        if finite is None or bool(finite):  # the one sync per step
            return
        if losses is not None and not torch.isfinite(losses).all():
            what = f"the training loss is {_describe(losses)} (micro-batch losses {losses.tolist()})"
        else:
            bad = [self.names.get(id(p), "?") for p in self.params
                   if p.grad is not None and not torch.isfinite(_local(p.grad)).all()]
            if not bad:
                raise self.error(step, "another rank saw a non-finite loss or gradient")
            first = next(_local(p.grad) for p in self.params
                         if p.grad is not None and not torch.isfinite(_local(p.grad)).all())
            loss_text = f"; loss {losses.mean().item():.4f}" if losses is not None else ""
            what = (f"the gradients hold {_describe(first)} in {len(bad)} of {len(self.params)} trainable tensors "
                    f"(first: {bad[0]}){loss_text}")
        self.on_train_end(args, state, control)  # the run ends here: leave the model without our hook
        raise self.error(step, what)

    def error(self, step: int, what: str) -> NonFiniteError:
        from tuneforge.train.resume import last_complete_checkpoint

        checkpoint = last_complete_checkpoint(self.output_dir)
        where = (f"the last good checkpoint is {checkpoint} (resume from it with --resume)" if checkpoint
                 else "no checkpoint was saved before it (set training.save_steps to keep some)")
        message = (f"training stopped at step {step}: {what}. The update was not applied; {where}. "
                   "Try a lower learning_rate, max_grad_norm > 0, or check that step's data")
        return NonFiniteError(message, step, checkpoint)

    def on_train_end(self, args, state, control, **kwargs):
        if self.hook is not None:
            self.hook.remove()
            self.hook = None


class Interrupted(RuntimeError):
    """Training stopped on Ctrl-C / SIGTERM after saving; the message says where and how to go on."""

    def __init__(self, message: str, step: int | None):
        super().__init__(message)
        self.step = step


class InterruptGuard(TrainerCallback):
    """Ctrl-C (SIGINT) or SIGTERM while training: finish the optimiser step under way, save a
    checkpoint (whatever training.save_steps says, so --resume can continue) and stop; `train`
    then saves the adapter as at the end of a run. A second Ctrl-C stops at once.

    Without this, a Ctrl-C with the default save_steps: 0 lost every finished step: the Trainer
    only saves on its schedule, and KeyboardInterrupt unwinds past the final save.

        guard = InterruptGuard()
        with guard.installed():        # the handlers live from here to the adapter's save
            trainer.train()
    """

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self):
        self.signal_name: str | None = None
        self.step: int | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # signal handlers: main thread only
            yield self
            return
        for name in self.SIGNALS:
            number = getattr(signal, name)
            self._previous[number] = signal.signal(number, self._handle)
        try:
            yield self
        finally:
            self._restore()

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number, frame):
        if self.requested:
            self._restore()
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(number).name
        print(f"\n{self.signal_name}: finishing this step, then saving a checkpoint and the adapter "
              "(Ctrl-C again stops at once, losing the steps since the last checkpoint)", file=sys.stderr, flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.requested
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Ranks may see the signal at different steps: all stop at the first step any saw it.
            flag = torch.tensor([int(stop)])
            if torch.distributed.get_backend() == "nccl":
                flag = flag.cuda()
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
            if stop and not self.requested:
                self.signal_name = "SIGINT (on another rank)"
        if stop:
            control.should_save = True
            control.should_training_stop = True
            self.step = state.global_step
        return control
