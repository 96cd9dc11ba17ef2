"""Training on several GPUs (or CPU processes): DDP and FSDP2 on torch.distributed, through accelerate.

tuneforge has no scheme of its own. `torchrun` (or `accelerate launch`) starts one process per
device; TRL's SFTTrainer, i.e. transformers' Trainer on accelerate, then wraps the model:

    ddp   every rank holds the whole model (4-bit base included) and a 1/N slice of each global
          batch; LoRA gradients are all-reduced after backward. For models that fit on one device.
    fsdp  FSDP2 (`torch.distributed.fsdp.fully_shard`): each decoder layer, the input embedding and
          the [final norm, lm_head] tail become one shard group; every parameter is split in N
          along dim 0 and all-gathered just before its group runs, freed right after. For jobs
          that do not fit on one device. Each rank still loads the whole (NF4) model before it is
          sharded (accelerate's rank-0-only loading cannot carry bitsandbytes weights), so the
          load must fit; what FSDP2 divides is the memory of the training steps.

What this module adds on top:
  - rank / world / device helpers (tuneforge.device, through tuneforge.switches: WORLD_SIZE, RANK,
    LOCAL_RANK), so each rank loads onto its own GPU (`device_map`, which the loader uses);
  - the FSDP2 settings for SFTConfig (`fsdp_arguments`): wrap the family's decoder layers,
    FULL_STATE_DICT saving (the adapter is written once, by rank 0, whole), and a mixed-precision
    policy that all-gathers in the compute dtype but reduces gradients in fp32;
  - QLoRA under FSDP2: bitsandbytes stores NF4 codes in a uint8 tensor by default, and FSDP2 can
    only shard floating parameters (accelerate leaves uint8 ones whole on every rank, defeating the
    point). With `bnb_4bit_quant_storage` equal to the compute dtype, the same packed bytes are
    typed bf16 and shard like any other weight (models.loader.quant_storage_dtype; `tuneforge train`
    passes fsdp=True to the loader, `accelerate launch --use_fsdp` says so through the `fsdp` switch);
  - `torchrun_command` / `relaunch`, behind `tuneforge train --nproc N`;
  - CPU runs with the gloo backend (what CI tests): accelerate only enables FSDP for accelerator
    devices, so `enable_fsdp_on_cpu` switches its state over, and the very same fully_shard path
    runs on gloo.
"""

from __future__ import annotations

import logging
import socket
import sys
from typing import Literal

import torch

from tuneforge import switches
from tuneforge.device import DistributedConfigError, device_map, local_rank, rank, world_size  # noqa: F401
from tuneforge.device import rank_device as device  # noqa: F401
from tuneforge.integration.peft import base_model
from tuneforge.switches import FSDP_ENV  # noqa: F401  (what `accelerate launch --use_fsdp` sets)

logger = logging.getLogger(__name__)

Strategy = Literal["ddp", "fsdp"]


# ---------------------------------------------------------------- where this process stands
# (tuneforge.device reads the launcher's variables; the loader places each rank with device_map)


def is_distributed() -> bool:
    """True under torchrun / accelerate launch with more than one process."""
    return world_size() > 1


def is_main_process() -> bool:
    return rank() == 0


def fsdp_requested() -> bool:
    """True when the launcher asked for FSDP (`accelerate launch --use_fsdp`: the `fsdp` switch)."""
    return switches.from_environment().fsdp


# ---------------------------------------------------------------- FSDP2 settings


def decoder_layer_classes(model: torch.nn.Module) -> list[str]:
    """Class names of `model`'s decoder layers (one FSDP2 shard group each), in model order.

    transformers marks them as GradientCheckpointingLayer; older models without that mark list
    them in `_no_split_modules`.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    names: list[str] = []
    for module in model.modules():
        name = type(module).__name__
        if isinstance(module, GradientCheckpointingLayer) and name not in names:
            names.append(name)
    if names:
        return names
    base = base_model(model)
    present = {type(m).__name__ for m in model.modules()}
    names = [n for n in (getattr(base, "_no_split_modules", None) or []) if n in present]
    if not names:
        raise DistributedConfigError(
            f"{type(base).__name__}: no decoder layer class found (no GradientCheckpointingLayer, no "
            "_no_split_modules); FSDP needs to know which modules to shard one by one"
        )
    return names


def mixed_precision_policy(compute_dtype: torch.dtype):
    """The FSDP2 MixedPrecisionPolicy for training in `compute_dtype` (None for fp32: no casts).

    param_dtype: parameters are all-gathered and used in the compute dtype (LoRA's fp32 master
      weights included, as under autocast on one GPU);
    reduce_dtype fp32: gradients are averaged across ranks in fp32. accelerate's default
      reduces in bf16, which rounds every LoRA gradient to 8 bits of mantissa before averaging.
    output_dtype: none. Layers compute in the compute dtype and return it anyway; accelerate's
      default (the compute dtype) also casts the root module's output, i.e. the fp32 loss of the
      chunked cross-entropy, to bf16: a logged loss of 12.5625 where one GPU logs 12.5788.
      accelerate's dict form insists on an output_dtype, hence the policy object itself.
    """
    if compute_dtype == torch.float32:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)


def fsdp_arguments(model: torch.nn.Module, *, reshard_after_forward: bool = True,
                   cpu_offload: bool = False) -> dict:
    """SFTConfig keyword arguments that train `model` with FSDP2.

    reshard_after_forward: free each layer's gathered weights after its forward and gather them
      again in backward (ZeRO-3, least memory); False keeps them until backward (ZeRO-2-like).
    cpu_offload: keep the shards in CPU memory between uses (slow; for models far beyond the GPUs).
    """
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "cpu_offload": cpu_offload,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": decoder_layer_classes(model),
            "reshard_after_forward": reshard_after_forward,
            # The adapter is saved whole by rank 0, so it is the same file whatever the rank count.
            "state_dict_type": "FULL_STATE_DICT",
            # Every rank loads the (4-bit) model itself; rank-0-only loading cannot carry Params4bit.
            "cpu_ram_efficient_loading": False,
        },
    }


def configure_arguments(args) -> None:
    """Adjust a TrainingArguments/SFTConfig in place before its __post_init__ runs.

    On a machine without CUDA, a launched job must ask accelerate for its CPU (gloo) mode: left
    alone, accelerate sees no GPU backend and each rank would train alone on the full dataset.
    """
    if is_distributed() and not torch.cuda.is_available() and not args.use_cpu:
        logger.info("distributed run without CUDA: %d CPU processes, gloo backend", world_size())
        args.use_cpu = True
    # transformers asks DDP to search for unused parameters whenever the model is not a bare
    # PreTrainedModel, which a peft model never is: a walk over the autograd graph after every
    # forward, on a step that is already bound by Python launching kernels. Every LoRA weight
    # takes part in every forward, so the search finds nothing; a setup where one does not gets
    # DDP's own error naming the parameter, and can set the flag back.
    if args.ddp_find_unused_parameters is None:
        args.ddp_find_unused_parameters = False
    # The only buffers are RoPE's inverse frequencies, computed identically on every rank:
    # broadcasting them from rank 0 before each forward is a collective for nothing.
    if args.ddp_broadcast_buffers is None:
        args.ddp_broadcast_buffers = False


def is_bitsandbytes_optimizer(name: str) -> bool:
    """True for the optimizer names (ours and transformers') that bitsandbytes implements."""
    return any(mark in name for mark in ("8bit", "bnb", "paged"))


def finish_arguments(args) -> None:
    """After TrainingArguments.__post_init__: FSDP2's mixed-precision policy and optimizer.

    bitsandbytes' optimizers run custom kernels that have no DTensor rule, so they cannot step
    FSDP2's sharded parameters (NotImplementedError at the first step). Under FSDP the optimizer
    state is sharded anyway, and LoRA's is small: 32-bit AdamW instead, with a log line.
    """
    plugin_args = getattr(args, "fsdp_plugin_args", None)
    if plugin_args is None:
        return
    compute = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    policy = mixed_precision_policy(compute)
    if policy is not None:
        plugin_args.setdefault("mixed_precision_policy", policy)
    optim = str(getattr(args.optim, "value", args.optim))
    if is_bitsandbytes_optimizer(optim):
        from transformers.training_args import OptimizerNames

        logger.warning("FSDP2: optim=%s (bitsandbytes) cannot step sharded parameters; using adamw_torch "
                       "(32-bit state, sharded over the ranks)", optim)
        args.optim = OptimizerNames.ADAMW_TORCH


def enable_fsdp_on_cpu(trainer) -> bool:
    """Switch accelerate to FSDP for a CPU (gloo) job that asked for it; True if switched.

    accelerate turns an FSDP plugin on only for accelerator device types and otherwise runs
    plain DDP without a word. Both the AcceleratorState and the PartialState it is re-read from
    must say FSDP; fully_shard itself supports the CPU.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    args = trainer.args
    state = trainer.accelerator.state
    if args.fsdp_plugin_args is None or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state = AcceleratorState()
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True
    logger.info("FSDP2 on %d CPU processes (gloo)", world_size())
    return True


def check_strategy(trainer, strategy: Strategy | None) -> None:
    """Fail loudly if the wrapper that runs is not the one asked for."""
    if strategy is None or not is_distributed():
        return
    fsdp = bool(getattr(trainer, "is_fsdp_enabled", False))
    if (strategy == "fsdp") != fsdp:
        raise DistributedConfigError(
            f"asked for {strategy} but accelerate set up {'fsdp' if fsdp else 'ddp'}; "
            "check the launcher's accelerate config (accelerate launch --use_fsdp / FSDP settings)"
        )


# ---------------------------------------------------------------- launching


def shutdown() -> None:
    """Leave the process group this process joined (a torchrun rank), so its gloo / NCCL threads
    end before the interpreter does: a rank that exits with them alive can abort after its work is
    done ("terminate called without an active exception", exit -6, seen on a CI run)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def free_port() -> int:
    """A TCP port nobody listens on now, for the rendezvous of a single-machine job."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(nproc: int, program: list[str], *, port: int | None = None) -> list[str]:
    """`python -m torch.distributed.run <options> <program>`: nproc processes on this machine.

    program: what torchrun runs in each process: a script and its arguments, or
      ["-m", module, args...].
    port: the rendezvous port; None lets torchrun pick one (--standalone).
    """
    if nproc < 1:
        raise DistributedConfigError(f"--nproc must be >= 1, got {nproc}")
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise DistributedConfigError(
            f"--nproc {nproc} but only {torch.cuda.device_count()} GPUs are visible; one process per GPU"
        )
    rendezvous = ["--standalone"] if port is None else ["--master-addr=127.0.0.1", f"--master-port={port}"]
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc-per-node={nproc}", *program]


def without_option(argv: list[str], option: str) -> list[str]:
    """`argv` without `option VALUE` / `option=VALUE` (or an abbreviation argparse would accept).

    The processes torchrun starts must not see `--nproc`: torchrun's own parser would take it
    for an abbreviation of its --nproc-per-node and stop.
    """
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        name = token.split("=", 1)[0]
        if len(name) > 2 and name.startswith("--") and option.startswith(name):
            skip = "=" not in token
            continue
        kept.append(token)
    return kept


def relaunch(nproc: int, cli_args: list[str]) -> int:
    """Run `tuneforge <cli_args>` (minus --nproc) in nproc processes under torchrun; returns its exit code."""
    import subprocess

    command = torchrun_command(nproc, ["-m", "tuneforge.cli", *without_option(cli_args, "--nproc")],
                               port=free_port())
    logger.info("launching %d processes: %s", nproc, " ".join(command))
    return subprocess.call(command)
