"""Every switch that picks a code path, resolved once into one frozen `Switches`.

This is the only module that reads `os.environ` (tests/test_layout.py checks it). Arguments given to
`FastLanguageModel.from_pretrained` / the CLI win over the environment; the environment wins over the
defaults. `resolve()` reads the environment again and makes the result current (the loader calls it
once per model and logs `Switches.line()`); `current()` returns the last one resolved (resolving
once from the environment when nothing did yet). Code below the loader gets the switches it needs as
arguments, or from the model's record (`model.tuneforge.switches`), never from the environment.
Checks made where no model exists (a data file named like a Hub dataset, a Hub push) call
`offline()`, which reads the offline variables at that moment, as huggingface_hub itself would.

The environment variables and what they choose:

| variable | switch | values |
|---|---|---|
| TUNEFORGE_DISABLE_KERNELS | kernels | 1/true/yes: the plain transformers + peft path |
| TUNEFORGE_VARLEN | varlen | 0: padding-free batches keep transformers' block-diagonal mask (A/B) |
| TUNEFORGE_LORA_GROUPS | lora_groups | 0: NF4 Q/K/V and gate/up one projection at a time (A/B) |
| TUNEFORGE_FLAT_OPTIMIZER | flat_optimizer | 0: bitsandbytes' 8-bit AdamW steps each tensor (A/B) |
| TUNEFORGE_NF4_GEMV | nf4_gemv | 1: our NF4 decode matmul on CUDA too (bitsandbytes' is faster on H100) |
| TUNEFORGE_RMS_NORM_FWD | rms_norm_launch | "ROWS,WARPS": the RMSNorm forward's launch (bench sweeps) |
| TUNEFORGE_CACHED_LAUNCH | cached_launch | 0: Triton kernels take Triton's own launch, not kernels/launcher.py's cached one (A/B) |
| TUNEFORGE_SOFTCAP_KERNEL | softcap_kernel | 0: soft-capped attention (Gemma 2) on transformers' eager path, not kernels/softcap_attention.py (A/B) |
| TUNEFORGE_CUDA_GRAPHS | cuda_graphs | 1: fixed-shape training steps replay a captured CUDA graph (train/graphed_step.py) |
| HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE, HF_DATASETS_OFFLINE | offline | any of them 1/true/yes/on: no Hub |
| ACCELERATE_USE_FSDP | fsdp | true: NF4 codes stored in the compute dtype so FSDP2 can shard them |
|   | | (`accelerate launch --use_fsdp` sets it; `tuneforge train` passes fsdp=True to the loader) |
| TRITON_INTERPRET | triton_interpreter | 1: Triton kernels run on the CPU (set before triton is imported) |
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

KERNELS_ENV = "TUNEFORGE_DISABLE_KERNELS"
VARLEN_ENV = "TUNEFORGE_VARLEN"
LORA_GROUPS_ENV = "TUNEFORGE_LORA_GROUPS"
FLAT_OPTIMIZER_ENV = "TUNEFORGE_FLAT_OPTIMIZER"
NF4_GEMV_ENV = "TUNEFORGE_NF4_GEMV"
RMS_NORM_LAUNCH_ENV = "TUNEFORGE_RMS_NORM_FWD"
CACHED_LAUNCH_ENV = "TUNEFORGE_CACHED_LAUNCH"
CUDA_GRAPHS_ENV = "TUNEFORGE_CUDA_GRAPHS"
SOFTCAP_KERNEL_ENV = "TUNEFORGE_SOFTCAP_KERNEL"
FSDP_ENV = "ACCELERATE_USE_FSDP"  # what `accelerate launch --use_fsdp` sets
OFFLINE_ENVS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")

_TRUE = ("1", "true", "yes", "on")


class SwitchError(ValueError):
    """An environment variable holds a value that is not one of its documented values."""


def _flag(name: str, default: bool) -> bool:
    """A 0/1 switch: unset or "" -> default; anything but 0/1/true/false/yes/no/on/off is refused."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in _TRUE:
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SwitchError(f"{name}={os.environ[name]!r}: write 1 or 0")


def _launch(name: str) -> tuple[int, int] | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        rows, warps = (int(v) for v in value.split(","))
    except ValueError:
        raise SwitchError(f"{name}={value!r}: expected 'ROWS,WARPS', e.g. '2,8'") from None
    if rows < 1 or rows & (rows - 1) or warps not in (1, 2, 4, 8, 16, 32):
        raise SwitchError(f"{name}={value!r}: ROWS must be a power of two, WARPS one of 1, 2, 4, 8, 16, 32")
    return rows, warps


# Set by the user before triton is imported; it cannot change inside a process, so read it once.
TRITON_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class Switches:
    """Which code paths run; see the module's table for the environment behind each field."""

    kernels: bool = True
    varlen: bool = True
    lora_groups: bool = True
    flat_optimizer: bool = True
    nf4_gemv: bool = False
    rms_norm_launch: tuple[int, int] | None = None
    cached_launch: bool = True
    cuda_graphs: bool = False
    softcap_kernel: bool = True
    offline: bool = False
    fsdp: bool = False
    triton_interpreter: bool = TRITON_INTERPRETER

    def line(self) -> str:
        """One log line naming every switch, e.g. `switches: kernels=on varlen=on ... fsdp=off`."""
        def word(value):
            if isinstance(value, bool):
                return "on" if value else "off"
            return "default" if value is None else ",".join(map(str, value))

        return "switches: " + " ".join(f"{f.name}={word(getattr(self, f.name))}" for f in dataclasses.fields(self))


def from_environment(**given) -> Switches:
    """Switches from the environment; keyword arguments that are not None win (e.g. kernels=False)."""
    found = Switches(
        kernels=not _flag(KERNELS_ENV, False),
        varlen=_flag(VARLEN_ENV, True),
        lora_groups=_flag(LORA_GROUPS_ENV, True),
        flat_optimizer=_flag(FLAT_OPTIMIZER_ENV, True),
        nf4_gemv=_flag(NF4_GEMV_ENV, False),
        rms_norm_launch=_launch(RMS_NORM_LAUNCH_ENV),
        cached_launch=_flag(CACHED_LAUNCH_ENV, True),
        cuda_graphs=_flag(CUDA_GRAPHS_ENV, False),
        softcap_kernel=_flag(SOFTCAP_KERNEL_ENV, True),
        offline=offline(),
        fsdp=_flag(FSDP_ENV, False),
    )
    unknown = set(given) - {f.name for f in dataclasses.fields(Switches)}
    if unknown:
        raise TypeError(f"unknown switches: {', '.join(sorted(unknown))}")
    return dataclasses.replace(found, **{k: v for k, v in given.items() if v is not None})


_current: list[Switches] = []


def resolve(**given) -> Switches:
    """Read the environment now (arguments win), make the result current and return it."""
    switches = from_environment(**given)
    _current[:] = [switches]
    return switches


def current() -> Switches:
    """The switches last resolved; resolved from the environment on first use."""
    return _current[0] if _current else resolve()


def offline() -> bool:
    """The offline flag read now (Switches.offline, for checks made where no model record exists)."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in OFFLINE_ENVS)


# --- other facts of the environment (not switches: where things live, who the user is) ------------


def cache_root() -> Path:
    """Where converted shipped models are kept: TUNEFORGE_CACHE, else $XDG_CACHE_HOME/tuneforge."""
    if os.environ.get("TUNEFORGE_CACHE"):
        return Path(os.environ["TUNEFORGE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tuneforge"


def hub_token() -> str | None:
    """HF_TOKEN, the token huggingface_hub reads itself (None when unset)."""
    return os.environ.get("HF_TOKEN") or None


def wandb_configured() -> bool:
    """True when Weights & Biases was told how to log (an API key or a mode)."""
    return bool(os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"))


def wandb_project() -> str:
    return os.environ.get("WANDB_PROJECT", "huggingface")


def env_int(name: str) -> int | None:
    """An integer launcher variable (WORLD_SIZE, RANK, LOCAL_RANK, ...); None when unset or empty."""
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise SwitchError(f"environment variable {name}={value!r} is not an integer") from None

