"""A cached Triton launch: `launch(kernel, grid, *args, **kw)` does what `kernel[grid](*args, **kw)` does.

Why (issue #16): on small models a training step is bound by the CPU issuing kernels, and
`JITFunction.run` costs ~31-43 µs of CPU per launch on the H100 host. Most of it is not the CUDA
launch: it is binding the arguments, building Triton's string cache key, building the launch
metadata for the profiler hooks and calling the (empty) hook chains. Here the compiled kernel that
the first normal launch returns is kept per (kernel, device, specialization key), and later calls
hand it the grid, the raw CUDA stream and the arguments directly.

What the direct call is, read in Triton's source (`runtime/jit.py: JITFunction.run`,
`compiler/compiler.py: CompiledKernel`, `backends/nvidia/driver.py: CudaLauncher.__call__`);
identical in 3.6 and 3.9:

    compiled.run(grid0, grid1, grid2, stream, compiled.function, compiled.packed_metadata,
                 launch_metadata, launch_enter_hook, launch_exit_hook, *every_argument)

`every_argument` is every parameter of the kernel in signature order, constexprs and None included
(Triton passes `bound_args.values()`; the launcher skips the positions its signature marks
"constexpr": 3.6's generated C parses them as objects and drops them, 3.9's `extractArgs` skips
ARG_CONSTEXPR). The hooks are `knobs.runtime.launch_enter_hook` / `launch_exit_hook`, empty
`HookChain`s by default that the C launcher calls unless they are None: with both empty we pass
None for them and for the launch metadata (what profilers such as proton read); with any hook set
we use Triton's own launch.

The specialization key. Triton compiles one kernel per (device, argument types, specialization,
constexpr values, options); the key here must change whenever Triton's would, or a kernel
compiled for other arguments runs silently. Per argument, as `native_specialize_impl` decides it
(probed on 3.6 and 3.9, same answers):
- int: 1 (becomes a constexpr), else its type (i32 / i64 / u64 by range) and whether it is a
  multiple of 16;
- tensor: dtype and whether data_ptr() is 16-byte aligned;
- bool (u1), float (always fp32), None (a constexpr): the type alone;
- constexpr parameters: their value and its type (True and 1 compare equal but compile apart);
plus the launch options (num_warps, num_stages, ...), the current device, and Triton's
process-wide compile knobs that its key reads (runtime.debug, compilation.instrumentation_mode).
The key may be finer than Triton's (e.g. ints of a `do_not_specialize` parameter still split on
16 | n): that only costs an extra entry, each filled by a normal launch with those arguments.

Triton's own launch is used, with one log line per kernel, under the Triton interpreter (CPU
tensors), without CUDA, for an argument type not listed above, for arguments Triton's binder
refuses (it then raises its own error), with launch hooks, a pre-run hook or a stage-inspection
hook set, for a kernel that is not a plain `@triton.jit` function (autotuned, heuristics), and on a
Triton version whose launcher was not read (VERIFIED_TRITON). A CPU tensor on a CUDA machine is
refused by the direct call exactly as by Triton's launch (both go through the C launcher's pointer
check). Skipped on the cached path: Triton's check that the globals a kernel reads have not changed
since it was compiled (the first launch of each key still runs it).

The switch `cached_launch` (TUNEFORGE_CACHED_LAUNCH=0 turns it off, for A/B benches) sends every
launch straight to `kernel[grid](...)`, before any plan is made or logged. `launch` reads it from
`switches.current()` on each call (the resolved Switches object, ~30 ns; the environment is read
only by `switches.resolve()`), so a later `resolve()` (the loader's, once per model) is honoured
from the next launch on.
"""

from __future__ import annotations

import inspect
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import triton

from tuneforge import switches
from tuneforge.switches import TRITON_INTERPRETER

logger = logging.getLogger(__name__)

# (major, minor) versions whose JITFunction.run / CompiledKernel / CudaLauncher were read for the
# call above; any other version takes Triton's own launch.
VERIFIED_TRITON = ((3, 6), (3, 9))


def triton_version_verified(version: str) -> bool:
    """Whether `version` (e.g. "3.6.0", "3.9.0+git1234") is one whose launcher call was verified."""
    match = re.match(r"(\d+)\.(\d+)(?!\d)", version)
    return match is not None and (int(match[1]), int(match[2])) in VERIFIED_TRITON


try:  # Triton's internals the cached path uses (present in every verified version)
    from triton import knobs as _knobs
    from triton.compiler.compiler import CompiledKernel as _CompiledKernel
    from triton.knobs import HookChain as _HookChain
    from triton.runtime.jit import JITFunction as _JITFunction
except ImportError:  # pragma: no cover - an unverified Triton; _BLOCKER below says so
    _knobs = _CompiledKernel = _HookChain = _JITFunction = None


def _fast_path_blocker() -> str | None:
    """Why no kernel in this process can take the cached path, or None; decided once at import."""
    if TRITON_INTERPRETER:
        return "Triton interpreter"
    if not triton_version_verified(triton.__version__) or _knobs is None:
        return f"triton {triton.__version__} is not one of the verified {VERIFIED_TRITON}"
    if not torch.cuda.is_available() or torch.version.hip is not None:
        return "no CUDA device"
    # Part of 3.9's compile options, but an environment read on every access: read once here; a
    # sanitizer run (its only user) keeps Triton's launch.
    if getattr(_knobs.compilation, "fpsan_homomorphic_casts", False):
        return "TRITON_FPSAN_HOMOMORPHIC_CASTS is on"
    return None


_BLOCKER = _fast_path_blocker()

try:  # what Triton's driver itself uses for the current stream (no Stream object per call)
    from torch._C import _cuda_getCurrentRawStream as _raw_stream
except ImportError:  # pragma: no cover - a CPU-only torch build

    def _raw_stream(device: int) -> int:
        return torch.cuda.current_stream(device).cuda_stream


class _Unsupported(Exception):
    """An argument the key does not cover: this call takes Triton's own launch."""


_BOOL = "u1"
_FLOAT = "fp32"
_Tensor = torch.Tensor


def argument_token(value: Any) -> Any:
    """The part of the specialization key for one non-constexpr argument (see the module docstring).

    Raises _Unsupported for a type whose specialization is not covered (tuples, tensor descriptors,
    ...). A CPU tensor is not refused here (one check less per argument per call): on a CUDA
    machine the direct call rejects it exactly as Triton's launch does, since both go through the
    C launcher's pointer check (cuPointerGetAttribute).
    """
    kind = type(value)
    if kind is _Tensor:  # the common case first; subclasses (Parameter) below
        return value.dtype, not value.data_ptr() & 15
    if kind is int:
        if value == 1:
            return 1
        aligned = not value & 15
        if -(2**31) <= value < 2**31:
            return 3 if aligned else 2
        if -(2**63) <= value < 2**63:
            return 5 if aligned else 4
        if value < 2**64:
            return 7 if aligned else 6
        raise _Unsupported("an int beyond 64 bits")
    if kind is float:
        return _FLOAT
    if isinstance(value, _Tensor):
        return value.dtype, not value.data_ptr() & 15
    if kind is bool:
        return _BOOL
    if value is None:
        return None
    raise _Unsupported(f"an argument of type {kind.__name__}")


def _make_binder(params) -> Callable:
    """A function with the kernel's signature (plus **options) that returns
    (every argument in signature order, the specialization part of the key, the options dict).

    Generated once per kernel so that Python's own call binding places positional and keyword
    arguments and fills defaults (a loop over the names cost several µs per launch); it raises
    TypeError where Triton's launch would (missing, duplicate or unknown-position arguments).
    Constexprs enter the key as (type, value): True and 1 are equal in Python but compile apart.
    """
    names = [p.name for p in params]
    signature, tokens = [], []
    namespace: dict[str, Any] = {"_tf_token": argument_token, "_tf_type": type}
    for i, (name, p) in enumerate(zip(names, params)):
        if p.has_default:
            namespace[f"_tf_default{i}"] = p.default
            signature.append(f"{name}=_tf_default{i}")
        else:
            signature.append(name)
        tokens.append(f"_tf_type({name}), {name}" if p.is_constexpr else f"_tf_token({name})")
    source = (
        f"def bind({', '.join(signature + ['**_tf_options'])}):\n"
        f"    return ({', '.join(names)},), ({', '.join(tokens)},), _tf_options\n"
    )
    exec(source, namespace)  # noqa: S102 - names are the kernel's parameter identifiers
    return namespace["bind"]


@dataclass
class _Plan:
    """What `launch` knows about one kernel: how to bind its arguments, its compiled kernels by key."""

    kernel: Any  # held so that id(kernel), the plan's key, is not reused
    name: str
    blocker: str | None  # why this kernel always takes Triton's launch, or None
    names: tuple[str, ...] = ()
    binder: Callable | None = None
    # key -> (launcher, CUfunction handle, packed metadata, CompiledKernel)
    cache: dict[tuple, tuple] = field(default_factory=dict)
    logged: bool = False


_PLANS: dict[int, _Plan] = {}


def _plan(kernel) -> _Plan:
    """The plan of `kernel`, made on its first launch; the parameters come from Triton's own
    parsing of the signature (`JITFunction.params`: names, constexpr annotations, defaults)."""
    name = getattr(kernel, "__name__", None) or repr(kernel)
    params = getattr(kernel, "params", None)
    plain = params is not None and all(p._param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)
    if _BLOCKER is not None:
        blocker = _BLOCKER
    elif type(kernel) is not _JITFunction or params is None:
        blocker = f"a {type(kernel).__name__}, not a plain @triton.jit function"
    elif not plain:
        blocker = "keyword-only or variadic parameters"
    else:
        blocker = None
    plan = _Plan(kernel, name, blocker)
    if plain:
        plan.names = tuple(p.name for p in params)
        plan.binder = _make_binder(params)
    _PLANS[id(kernel)] = plan
    return plan


def _triton_launch(plan: _Plan, kernel, grid, args, kwargs, reason: str):
    if not plan.logged:
        plan.logged = True
        logger.info("launch: %s takes Triton's own launch (%s)", plan.name, reason)
    return kernel[grid](*args, **kwargs)


def _hooks_idle() -> bool:
    runtime = _knobs.runtime
    enter, exit_ = runtime.launch_enter_hook, runtime.launch_exit_hook
    return (
        (enter is None or (type(enter) is _HookChain and not enter.calls))
        and (exit_ is None or (type(exit_) is _HookChain and not exit_.calls))
        and getattr(runtime, "add_stages_inspection_hook", None) is None
    )


def launch(kernel, grid, *args, **kwargs):
    """`kernel[grid](*args, **kwargs)`, with later launches of the same specialization cached.

    kernel: a `@triton.jit` function; grid: a tuple of 1-3 ints, or a callable of the bound
    arguments (a dict by name) as Triton takes it; args / kwargs: the kernel's arguments, its
    constexprs and Triton's launch options (num_warps, num_stages, ...), as for `kernel[grid]`.
    Returns the CompiledKernel, like `kernel[grid](...)`. With the switch `cached_launch` off
    (TUNEFORGE_CACHED_LAUNCH=0) it is exactly `kernel[grid](*args, **kwargs)`.
    """
    if not switches.current().cached_launch:
        return kernel[grid](*args, **kwargs)
    plan = _PLANS.get(id(kernel))
    if plan is None:
        plan = _plan(kernel)
    if plan.blocker is not None:
        return _triton_launch(plan, kernel, grid, args, kwargs, plan.blocker)
    if kernel.pre_run_hooks or not _hooks_idle():
        return _triton_launch(plan, kernel, grid, args, kwargs, "launch or pre-run hooks are set")
    device = torch.cuda.current_device()
    try:
        full, spec, options = plan.binder(*args, **kwargs)
        # Besides the arguments: the device (Triton compiles per device) and the process-wide
        # knobs that Triton's own key reads on every launch.
        key = (device, _knobs.runtime.debug, _knobs.compilation.instrumentation_mode, spec,
               tuple(options.items()) if options else ())
        entry = plan.cache.get(key)
    except _Unsupported as why:
        return _triton_launch(plan, kernel, grid, args, kwargs, str(why))
    except TypeError as why:  # arguments Triton will refuse too, or an unhashable constexpr
        return _triton_launch(plan, kernel, grid, args, kwargs, f"TypeError: {why}")
    if entry is None:
        compiled = kernel[grid](*args, **kwargs)
        # Triton's launch returns the CompiledKernel it ran, its handles loaded (`run` and
        # `function` are set by the launch). Anything else (e.g. a future under async
        # compilation) is not cached: the next call launches normally again.
        if type(compiled) is _CompiledKernel and compiled.function is not None:
            plan.cache[key] = (compiled.run, compiled.function, compiled.packed_metadata, compiled)
        return compiled
    run, function, metadata, compiled = entry
    if callable(grid):
        grid = grid(dict(zip(plan.names, full)))
    size = len(grid)
    run(
        grid[0], grid[1] if size > 1 else 1, grid[2] if size > 2 else 1,
        _raw_stream(device), function, metadata, None, None, None, *full,
    )
    return compiled
