"""Which tuneforge ops ran, in order: a recorder for tests that check what a step computes.

`record_ops(monkeypatch)` spies on every op of `kernels.registry.OPS`:

- the op's public function (`kernels.rms_norm.rms_norm`, `kernels.lora.lora_qkv`, ...), recorded
  under the op's name, wherever a loaded tuneforge module holds it: callers import it by name
  (`from tuneforge.kernels.rms_norm import rms_norm` in patch/norms.py), so every module attribute
  that is the function is replaced, not only the kernel module's own;
- the backward of the op's autograd Function (the `extras` that are `torch.autograd.Function`s),
  recorded as "<op> backward". A Function's backward that another one's backward calls directly
  (`LoRALinearFunction` runs `LoRAQKVFunction`'s) is part of it and not recorded again.

Calls made inside a recorded call are recorded one level deeper (`Entry.depth`): `lora_qkv` holds
`group_forward`, which holds `rank_update`. A backward entry is written when it first records a
nested op, or when it returns: unpacking its saved tensors may first recompute a checkpointed
layer (`OpTrace.section`), and the recomputation then comes before the backward it serves.

Only modules loaded when `record_ops` is called are patched: build the model first.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
from dataclasses import dataclass, field

import torch

__all__ = ["Entry", "OpTrace", "record_ops"]


@dataclass(frozen=True)
class Entry:
    """One recorded call: `name` ("rms_norm", "lora_mlp backward") at `depth` (0: called by no
    other recorded call), under the label current when it was written (`OpTrace.mark`)."""

    label: str
    depth: int
    name: str


@dataclass
class OpTrace:
    """The calls recorded so far, in order, and the label they are filed under."""

    entries: list[Entry] = field(default_factory=list)
    label: str = ""
    # One list of open calls ([name, written, is_backward]) per open section, outermost first.
    _frames: list[list[list]] = field(default_factory=lambda: [[]])

    def mark(self, label: str) -> None:
        """File the entries written from now on under `label`."""
        self.label = label

    @contextlib.contextmanager
    def section(self, label: str):
        """Entries inside are filed under `label`, counted from depth 0 whatever is open around
        them (a layer recomputed inside a backward), and written before that open call; the
        label stays current after the section."""
        self.label = label
        self._frames.append([])
        try:
            yield
        finally:
            self._frames.pop()
            self.label = label

    def by_label(self) -> dict[str, list[tuple[int, str]]]:
        """label -> [(depth, name), ...] in call order, labels in the order they first appear."""
        grouped: dict[str, list[tuple[int, str]]] = {}
        for entry in self.entries:
            grouped.setdefault(entry.label, []).append((entry.depth, entry.name))
        return grouped

    def _write_open(self, frame: list[list]) -> None:
        for depth, call in enumerate(frame):
            if not call[1]:
                self.entries.append(Entry(self.label, depth, call[0]))
                call[1] = True

    def _enter(self, name: str, backward: bool) -> bool:
        """Open a call; False when it is not recorded (a backward run by another backward)."""
        frame = self._frames[-1]
        if backward and frame and frame[-1][2]:
            return False
        if not backward:
            self._write_open(frame)
            self.entries.append(Entry(self.label, len(frame), name))
        frame.append([name, not backward, backward])
        return True

    def _exit(self) -> None:
        frame = self._frames[-1]
        if not frame[-1][1]:
            self._write_open(frame)
        frame.pop()


def _spy(trace: OpTrace, name: str, function, backward: bool = False):
    @functools.wraps(function)
    def spy(*args, **kwargs):
        if not trace._enter(name, backward):
            return function(*args, **kwargs)
        try:
            return function(*args, **kwargs)
        finally:
            trace._exit()

    return spy


def record_ops(monkeypatch) -> OpTrace:
    """Spy on every op of the registry while `monkeypatch` holds; returns the trace that fills."""
    from tuneforge.kernels.registry import OPS

    trace = OpTrace()
    loaded = [m for name, m in list(sys.modules.items()) if m is not None and name.startswith("tuneforge")]
    for op in OPS:
        module = importlib.import_module(f"tuneforge.kernels.{op.module}")
        function = getattr(module, op.function)
        spy = _spy(trace, op.name, function)
        for holder in loaded:
            for attribute, value in list(vars(holder).items()):
                if value is function:
                    monkeypatch.setattr(holder, attribute, spy)
        for extra in op.extras:
            value = getattr(module, extra)
            if isinstance(value, type) and issubclass(value, torch.autograd.Function):
                # autograd looks `backward` up on the class at every call: a static spy is seen
                monkeypatch.setattr(value, "backward", staticmethod(_spy(trace, f"{op.name} backward",
                                                                        value.backward, backward=True)))
    return trace
