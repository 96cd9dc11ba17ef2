"""Gradient checkpointing of decoder layers: transformers' own, or ours with the layer inputs offloaded.

With checkpointing, each decoder layer keeps only its input hidden state `[batch, seq, hidden]`
between forward and backward and recomputes everything inside it. Those inputs still add up to
`layers x batch x seq x hidden` on the GPU: 8 GiB in bf16 for Llama-3.1-8B at 32k tokens, and
linear in the sequence length. The "offload" mode moves them to pinned CPU memory:

    forward, layer i:   main stream computes x_i ──event──> side stream copies x_i to pinned CPU,
                        the GPU copy of x_i is freed once the side stream has read it
    backward, layer i:  x_i is back on the GPU (prefetched while layer i+1 recomputed), the main
                        stream waits for that copy; x_{i-1}'s copy back starts now, overlapping
                        with layer i's recomputation and backward

The mechanism is PyTorch's non-reentrant `torch.utils.checkpoint.checkpoint` with a
`saved_tensors_hooks` pair around it: checkpoint saves the layer's input as an ordinary saved
tensor (its own hooks take over everything inside the layer), so our pack hook sees exactly that
one tensor per layer. Non-reentrant checkpointing gives, for free: replayed RNG state (dropout
masks match), gradients for layers whose input does not require grad (frozen embeddings + LoRA),
gradients for tensors reaching the layer through keyword arguments, and DDP compatibility.

It plugs into transformers through `GradientCheckpointingLayer`: each decoder layer calls
`self._gradient_checkpointing_func(partial(layer.__call__, **kwargs), *args)`; we enable
transformers' checkpointing and replace that function on every such layer.
"""

from __future__ import annotations

import functools
import logging
import math
import mmap
import weakref

import torch
from torch.utils.checkpoint import checkpoint

from tuneforge.device import is_capturing
from tuneforge.integration.peft import base_model

logger = logging.getLogger(__name__)

# Accepted values of `use_gradient_checkpointing` -> what runs. "unsloth" is Unsloth's name for
# its offloaded variant; accepting it lets Unsloth scripts run unchanged.
MODES: dict[object, str | None] = {
    True: "standard",
    "standard": "standard",
    "offload": "offload",
    "unsloth": "offload",
    False: None,
}


def resolve_mode(mode) -> str | None:
    """`True | "standard" | "offload" | "unsloth" | False` -> "standard", "offload" or None."""
    # `1 == True` in Python: look booleans up by identity so that 1 / 0 are rejected, not accepted.
    for key, value in MODES.items():
        if mode is key or (isinstance(mode, str) and isinstance(key, str) and mode == key):
            return value
    raise ValueError(
        f"use_gradient_checkpointing={mode!r} is not a mode; write one of "
        'True (or "standard"), "offload" (or its alias "unsloth"), or False.'
    )


def enable_gradient_checkpointing(model: torch.nn.Module, mode=True) -> str | None:
    """Switch gradient checkpointing of `model`'s decoder layers on (standard or offloaded) or off.

    model: a transformers `PreTrainedModel`, or a peft `PeftModel` around one.
    mode:  True / "standard": transformers' checkpointing (non-reentrant);
           "offload" / "unsloth": the same, with each layer's input kept in pinned CPU memory;
           False: no checkpointing.
    Returns the mode that now runs: "standard", "offload" or None.
    """
    kind = resolve_mode(mode)
    base = _transformers_model(model)
    if kind is None:
        _call_enable_or_disable(base, enable=False)
        logger.info("gradient checkpointing: off")
        return None

    _call_enable_or_disable(base, enable=True)
    if kind == "offload":
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [
            m for m in base.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing
        ]
        if not layers:
            raise NotImplementedError(
                f"{type(base).__name__} does not use transformers' GradientCheckpointingLayer, so its layer "
                'inputs cannot be offloaded; use use_gradient_checkpointing=True (standard) instead.'
            )
        # One offloader per model: its prefetch chain links the layers of one forward pass.
        run = functools.partial(offloaded_checkpoint, offloader=LayerInputOffloader())
        for layer in layers:
            layer._gradient_checkpointing_func = run
        logger.info("gradient checkpointing: offload (%d decoder layers keep their input on the CPU)", len(layers))
    else:
        logger.info("gradient checkpointing: standard (transformers, non-reentrant)")
    return kind


def active_mode(model: torch.nn.Module) -> str | None:
    """The checkpointing that runs now in `model`'s decoder layers: "offload", "standard" or None."""
    try:
        base = _transformers_model(model)
    except (TypeError, NotImplementedError):
        return None
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if not layers:
        return None
    return "offload" if _offloader_of(layers[0]) is not None else "standard"


def layer_input_offloader(model: torch.nn.Module) -> "LayerInputOffloader | None":
    """The offloader of `model`'s offloaded checkpointing (one per model, shared by its layers), or
    None when no decoder layer checkpoints with it now."""
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) and (offloader := _offloader_of(module)) is not None:
            return offloader
    return None


def _offloader_of(layer: torch.nn.Module) -> "LayerInputOffloader | None":
    run = getattr(layer, "_gradient_checkpointing_func", None)
    if isinstance(run, functools.partial) and run.func is offloaded_checkpoint:
        return run.keywords["offloader"]
    return None


def keep_offloaded_checkpointing(model: torch.nn.Module, args) -> None:
    """Turn off `args.gradient_checkpointing` (logged) when `model` already offloads: the Trainer
    would re-enable transformers' standard checkpointing over it, keeping every layer input on
    the GPU (8 GiB more for Llama-3.1-8B at 32k tokens), without a word."""
    if getattr(args, "gradient_checkpointing", False) and active_mode(model) == "offload":
        logger.warning("gradient_checkpointing=True in the training arguments would replace the offloaded "
                       "checkpointing that get_peft_model set up; keeping the offloaded one")
        args.gradient_checkpointing = False


def _transformers_model(model: torch.nn.Module):
    """The transformers PreTrainedModel inside `model` (a PeftModel's base model, or `model` itself)."""
    from transformers import PreTrainedModel

    inner = base_model(model)
    if not isinstance(inner, PreTrainedModel):
        raise TypeError(
            f"gradient checkpointing needs a transformers PreTrainedModel (or a peft model around one), "
            f"got {type(model).__name__}"
        )
    if not inner.supports_gradient_checkpointing:
        raise NotImplementedError(f"{type(inner).__name__} does not support gradient checkpointing in transformers")
    return inner


def _call_enable_or_disable(base, *, enable: bool) -> None:
    # transformers 5.23 renamed gradient_* to activation_* (the old names warn); 5.17 has only the old.
    kwargs = {"use_reentrant": False}
    if enable and hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif enable:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif hasattr(base, "activation_checkpointing_disable"):
        base.activation_checkpointing_disable()
    else:
        base.gradient_checkpointing_disable()


def offloaded_checkpoint(function, *args, offloader: "LayerInputOffloader"):
    """Checkpoint one decoder layer call, keeping only its input hidden state, offloaded.

    function: the layer's `__call__` with its keyword arguments bound (transformers passes a partial).
    args:     positional arguments; args[0] is the hidden state `[batch, seq, hidden]`. If the layer
              was called with `hidden_states=` as a keyword, it is taken out of the partial.
    The other arguments (attention mask, position embeddings, ...) are shared by all layers and
    stay referenced by the closure, not copied per layer.
    """
    if args:
        hidden, rest = args[0], args[1:]
        run = (lambda h: function(h, *rest)) if rest else function
    elif isinstance(function, functools.partial) and "hidden_states" in function.keywords:
        keywords = dict(function.keywords)
        hidden = keywords.pop("hidden_states")
        inner = functools.partial(function.func, *function.args, **keywords)
        run = lambda h: inner(hidden_states=h)  # noqa: E731
    else:
        raise TypeError("offloaded checkpointing needs the layer's hidden state as its first argument")
    with offloader.hooks():
        # Saving the RNG state reads it on the host, which a CUDA-graph capture forbids; graphed
        # steps refuse models with dropout (train/graphed_step.py), so there is nothing to replay.
        return checkpoint(run, hidden, use_reentrant=False, preserve_rng_state=not is_capturing(hidden.device))


class LayerInputOffloader:
    """Saved-tensor hooks that park checkpointed layers' inputs in pinned CPU memory.

    `pack` is called once per layer in forward (with the layer's input), `unpack` once per layer
    in backward, in reverse layer order, when the layer is about to be recomputed.
    Tensors not on a CUDA device are kept as they are (there is no GPU memory to save).
    """

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._last: weakref.ref | None = None  # the most recently packed _Offloaded
        self._logged_paths: set[str] = set()
        # Graphed steps (train/graphed_step.py): the host buffers of one pass, reused by pack order.
        # A captured copy writes to a fixed address on every replay, so the buffers must outlive
        # the capture; they are page-locked with cudaHostRegister, not taken from torch's pinned
        # pool, whose per-copy event bookkeeping cannot run inside a capture.
        # One set per captured graph (its key): a graph replays the addresses it was captured with.
        self._static_sets: dict[object, list[torch.Tensor]] = {}
        self._static: list[torch.Tensor] | None = None
        self._static_next = 0

    def use_static_buffers(self, key) -> None:
        """Until `use_pinned_pool()`, passes take their host buffers, in pack order, from set `key`
        (made on first use). Call before each pass of the graph named `key`."""
        self._static = self._static_sets.setdefault(key, [])
        self._static_next = 0

    def use_pinned_pool(self) -> None:
        """Back to a fresh pinned buffer per layer input (eager steps)."""
        self._static = None

    def release_static_buffers(self) -> None:
        # Each buffer unregisters itself when freed (_page_locked_empty).
        self._static_sets.clear()
        self._static = None

    def _host_buffer(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._static is None:
            return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        index, self._static_next = self._static_next, self._static_next + 1
        if index < len(self._static):
            buffer = self._static[index]
            if buffer.shape == tensor.shape and buffer.dtype == tensor.dtype:
                return buffer
            if is_capturing(tensor.device):
                raise RuntimeError(f"offloaded checkpointing: layer input {index} changed shape during capture")
        elif is_capturing(tensor.device):
            raise RuntimeError("offloaded checkpointing: more layer inputs during capture than in warm-up")
        buffer = _page_locked_empty(tensor.shape, tensor.dtype)
        if index < len(self._static):
            self._static[index] = buffer
        else:
            self._static.append(buffer)
        return buffer

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self._pack_real_tensors, self.unpack)

    def _pack_real_tensors(self, tensor: torch.Tensor):
        # torch 2.11's non-reentrant checkpoint also saves an empty placeholder tensor (2.13's does
        # not): nothing to offload there, and it must not count as a layer input.
        if tensor.numel() == 0:
            return tensor
        return self.pack(tensor)

    def pack(self, tensor: torch.Tensor):
        if tensor.device.type != "cuda":
            self._log_path_once(
                tensor.device.type,
                f"gradient checkpointing (offload): layer inputs are on {tensor.device.type}, kept in place "
                "(no CUDA device, nothing to offload)",
            )
            return tensor
        self._log_path_once(
            "cuda", "gradient checkpointing (offload): layer inputs go to pinned CPU memory on a side CUDA stream"
        )
        stream = self._streams.get(tensor.device)
        if stream is None:
            stream = self._streams[tensor.device] = torch.cuda.Stream(tensor.device)
        previous = self._last() if self._last is not None else None
        packed = _Offloaded(tensor, stream, previous, self._host_buffer(tensor))
        self._last = weakref.ref(packed)
        return packed

    def unpack(self, packed) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        packed.fetch()
        # Backward visits layers in reverse: the layer packed before this one is recomputed next.
        # Start its copy back now so that it overlaps with this layer's recomputation.
        earlier = packed.previous() if packed.previous is not None else None
        if earlier is not None:
            earlier.fetch()
        return packed.take()

    def _log_path_once(self, key: str, message: str) -> None:
        if key not in self._logged_paths:
            self._logged_paths.add(key)
            logger.info(message)


_PAGE = mmap.PAGESIZE


def _page_locked_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An empty CPU tensor on whole pages of its own, page-locked with cudaHostRegister for as long
    as it lives. Whole pages: registering a range that shares a page with another registered range
    (two small buffers side by side, or a freed one never unregistered) fails with "already mapped"."""
    nbytes = math.prod(shape) * dtype.itemsize
    rounded = max(_PAGE, -(-nbytes // _PAGE) * _PAGE)
    raw = torch.empty(rounded + _PAGE, dtype=torch.uint8)
    start = (-raw.data_ptr()) % _PAGE
    region = raw[start:start + rounded]
    result = torch.cuda.cudart().cudaHostRegister(region.data_ptr(), rounded, 0)
    if int(result) != 0:
        raise RuntimeError(f"cudaHostRegister failed ({result}) for a {rounded}-byte layer input buffer")
    buffer = region[:nbytes].view(dtype).view(shape)
    # The view keeps `raw`'s storage alive; unregister before that storage can be freed and reused.
    weakref.finalize(buffer, torch.cuda.cudart().cudaHostUnregister, region.data_ptr())
    return buffer


class _Offloaded:
    """One layer input living in pinned CPU memory, with the events that order its two copies."""

    __slots__ = ("cpu", "device", "stream", "previous", "copied_out", "gpu", "copied_in", "__weakref__")

    def __init__(self, tensor: torch.Tensor, stream: torch.cuda.Stream, previous: "_Offloaded | None",
                 cpu: torch.Tensor) -> None:
        self.device = tensor.device
        self.stream = stream
        # A weak link: a finished step's entries must not be kept alive by the next step's.
        self.previous = weakref.ref(previous) if previous is not None else None
        # The copy must not start before the kernel that produced `tensor` has run.
        stream.wait_stream(torch.cuda.current_stream(tensor.device))
        self.cpu = cpu
        with torch.cuda.stream(stream):
            self.cpu.copy_(tensor, non_blocking=True)
            self.copied_out = torch.cuda.Event()
            self.copied_out.record(stream)
        # Autograd drops its reference to `tensor` right after this hook; without this the caching
        # allocator could hand its memory to the next kernel on the main stream while the side
        # stream is still reading it.
        tensor.record_stream(stream)
        self.gpu: torch.Tensor | None = None
        self.copied_in: torch.cuda.Event | None = None

    def fetch(self) -> None:
        """Start the copy back to the GPU (once) on the side stream."""
        if self.gpu is not None:
            return
        main = torch.cuda.current_stream(self.device)
        # Allocated from the main stream's pool, so the main stream can use and free it normally;
        # the side stream writes into it only after the main stream's earlier work (which may have
        # used this memory before it was freed) is done.
        gpu = torch.empty(self.cpu.shape, dtype=self.cpu.dtype, device=self.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            # Same stream as the copy out, so it is ordered after it; the event makes that explicit.
            self.stream.wait_event(self.copied_out)
            gpu.copy_(self.cpu, non_blocking=True)
            self.copied_in = torch.cuda.Event()
            self.copied_in.record(self.stream)
        self.gpu = gpu

    def take(self) -> torch.Tensor:
        """The GPU tensor, once the main stream has waited for its copy. The CPU copy is kept for a
        second backward through the same graph (retain_graph=True)."""
        torch.cuda.current_stream(self.device).wait_event(self.copied_in)
        gpu, self.gpu = self.gpu, None
        return gpu
