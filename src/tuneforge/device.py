"""What the machine can do: accelerator, bf16 support, the compute dtype to train in."""

import torch


def has_cuda() -> bool:
    return torch.cuda.is_available()


def is_bfloat16_supported() -> bool:
    """True where bf16 matrix work is fast: a CUDA GPU of compute capability 8.0 or newer.

    On a CPU this is False on purpose: bitsandbytes' NF4 path runs ~20x slower with a bf16
    compute dtype than with fp32 there (64 s vs 3.1 s a SmolLM2 LoRA step, measured on 2 cores).
    """
    return has_cuda() and torch.cuda.is_bf16_supported(including_emulation=False)


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
