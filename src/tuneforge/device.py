"""What the machine can do (accelerator, bf16 support, the compute dtype to train in) and where this
process stands in a launched job (rank, world size, the GPU it loads onto)."""

import torch

from tuneforge import switches


class DistributedConfigError(ValueError):
    """A distributed setting is wrong or impossible here; the message says what to do instead."""


def has_cuda() -> bool:
    return torch.cuda.is_available()


def is_bfloat16_supported() -> bool:
    """True where bf16 matrix work is fast: a CUDA GPU of compute capability 8.0 or newer.

    On a CPU this is False on purpose: bitsandbytes' NF4 path runs ~20x slower with a bf16
    compute dtype than with fp32 there (64 s vs 3.1 s a SmolLM2 LoRA step, measured on 2 cores).
    """
    return has_cuda() and torch.cuda.is_bf16_supported(including_emulation=False)


def is_capturing(device: torch.device) -> bool:
    """Whether work issued now on `device` is being recorded into a CUDA graph (not run).

    Code that reads a tensor's value on the host (a check, a cache keyed on Python state) must not
    run while capturing: a host sync is illegal there, and a Python-side decision is frozen into
    every replay."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def default_compute_dtype() -> torch.dtype:
    """bf16 on Ampere+ GPUs, fp16 on older GPUs, fp32 on the CPU."""
    if not has_cuda():
        return torch.float32
    return torch.bfloat16 if is_bfloat16_supported() else torch.float16


def default_device() -> torch.device:
    return torch.device("cuda" if has_cuda() else "cpu")


def peak_memory_gib() -> float:
    """Peak allocated accelerator memory, or the process's peak RSS on the CPU, in GiB."""
    if has_cuda():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ---------------------------------------------------------------- where this process stands


def _launcher_int(name: str, default: int) -> int:
    try:
        value = switches.env_int(name)
    except switches.SwitchError as error:
        raise DistributedConfigError(str(error)) from None
    return default if value is None else value


def world_size() -> int:
    """Processes in this job (1 without a launcher). torchrun and accelerate set WORLD_SIZE."""
    return _launcher_int("WORLD_SIZE", 1)


def rank() -> int:
    """This process's global index, 0 .. world_size-1."""
    return _launcher_int("RANK", 0)


def local_rank() -> int:
    """This process's index on its machine: the GPU it owns."""
    return _launcher_int("LOCAL_RANK", 0)


def rank_device() -> torch.device:
    """The device this rank trains on: cuda:LOCAL_RANK, or the CPU without CUDA."""
    if not has_cuda():
        return torch.device("cpu")
    index = local_rank() if world_size() > 1 else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise DistributedConfigError(
            f"LOCAL_RANK {index} but only {torch.cuda.device_count()} CUDA devices are visible: "
            "start at most one process per GPU (torchrun --nproc_per_node <= GPU count)"
        )
    return torch.device("cuda", index)


def device_map():
    """`device_map` for from_pretrained: the whole model on this rank's device.

    Every rank must load onto its own GPU; `torch.cuda.current_device()` is 0 in every fresh
    process, which would put all ranks' copies on GPU 0. Under a launcher the rank's GPU also
    becomes the current device, so that whatever allocates on plain "cuda" before accelerate
    sets it (CUDA's context, bitsandbytes, our kernels' scratch) lands there too.
    """
    where = rank_device()
    if where.type != "cuda":
        return "cpu"
    if world_size() > 1:
        torch.cuda.set_device(where)
    return {"": where.index}
