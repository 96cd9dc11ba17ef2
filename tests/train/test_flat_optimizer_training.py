"""FlatAdamW8bit through the Trainer: a run trains exactly as with bitsandbytes' per-tensor
AdamW8bit, its adapter (views into one buffer while training) saves and reloads, and a stopped
run resumes from its checkpoint (or from a per-tensor run's) to the unbroken run's adapter, bit
for bit; under DDP (2 gloo processes) the flat and the per-tensor optimizer agree too.

The tiny chat model with r=72: its LoRA matrices of 4608 and 12672 elements get 8-bit state
(flat buffers; 12672 is not a whole number of 256-element blocks, so segments are padded) and
k/v's B of 2304 elements 32-bit state (stepped alone).
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from safetensors.torch import load_file
from tiny_chat_model import save_tiny_chat_model
from transformers import TrainerCallback

from tuneforge.config import config_from_dict
from tuneforge.train.command import train

STEPS, SAVE_AT = 6, 3
ADAPTER = "adapter_model.safetensors"


class StopAt(TrainerCallback):
    """Ends the run after optimizer step `step` (its checkpoint is saved first), like a kill."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _config(model_dir, output_dir):
    return config_from_dict({
        "model": {"name": str(model_dir), "load_in_4bit": False, "max_seq_length": 256, "use_kernels": False},
        "lora": {"r": 72, "lora_alpha": 16, "lora_dropout": 0.0, "use_gradient_checkpointing": False},
        "training": {"output_dir": str(output_dir), "max_steps": STEPS, "save_steps": SAVE_AT,
                     "per_device_train_batch_size": 2, "learning_rate": 2e-3, "warmup_steps": 2,
                     "weight_decay": 0.01, "optim": "adamw_8bit", "report_to": "none"},
    })


def _run(model_dir, output_dir, *, flat: bool, stop_at: int | None = None, resume: bool = False):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TUNEFORGE_FLAT_OPTIMIZER", "1" if flat else "0")
        callbacks = (StopAt(stop_at),) if stop_at else ()
        train(_config(model_dir, output_dir), resume=resume, extra_callbacks=callbacks)
    return load_file(output_dir / "adapter" / ADAPTER)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Final adapters of: flat and per-tensor runs; flat runs resumed from a flat and from a
    per-tensor run stopped at step SAVE_AT. One torch thread: the same reductions in every run."""
    folder = tmp_path_factory.mktemp("flat-optimizer")
    model_dir = save_tiny_chat_model(folder / "model")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    messages, logger = _Messages(), logging.getLogger("tuneforge.train.optim")
    level = logger.level
    logger.addHandler(messages)
    logger.setLevel(logging.INFO)
    try:
        adapters = {
            "flat": _run(model_dir, folder / "flat", flat=True),
            "per_tensor": _run(model_dir, folder / "per_tensor", flat=False),
        }
        for source in ("flat", "per_tensor"):
            output = folder / f"resumed_from_{source}"
            _run(model_dir, output, flat=source == "flat", stop_at=SAVE_AT)
            assert (output / f"checkpoint-{SAVE_AT}" / "optimizer.pt").is_file()
            assert not (output / f"checkpoint-{STEPS}").exists()
            adapters[f"resumed_from_{source}"] = _run(model_dir, output, flat=True, resume=True)
    finally:
        torch.set_num_threads(threads)
        logger.removeHandler(messages)
        logger.setLevel(level)
    return folder, model_dir, adapters, messages.lines


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_flat_training_equals_per_tensor_training(runs):
    _, _, adapters, log = runs
    # 2 layers x (7 A + 7 B) matrices; k's and v's B ([32, 72]) keep 32-bit state.
    flat_line = "FlatAdamW8bit: 24 tensors (158,976 elements) in 1 flat buffer(s); 4 stepped one by one"
    assert sum(line.startswith(flat_line) for line in log) == 4, log  # the flat run, the stopped and resumed ones
    assert sum("TUNEFORGE_FLAT_OPTIMIZER=0" in line for line in log) == 2
    assert adapters["flat"].keys() == adapters["per_tensor"].keys() and len(adapters["flat"]) == 2 * 7 * 2
    for name, weight in adapters["per_tensor"].items():
        assert torch.equal(adapters["flat"][name], weight), name
        if "lora_B" in name:  # zeros before the first step: the buffer's updates reached every one
            assert weight.abs().min() > 0, name


@pytest.mark.parametrize("source", ["flat", "per_tensor"])
def test_stopped_run_resumes_to_the_unbroken_runs_adapter(runs, source):
    adapters = runs[2]
    for name, weight in adapters["flat"].items():
        assert torch.equal(adapters[f"resumed_from_{source}"][name], weight), name


def test_saved_adapter_reloads_with_peft_to_the_trained_weights(runs):
    """While training, the adapter's matrices are views into one buffer; the saved file must hold
    each one's own values (safetensors refuses overlapping views, peft clones shared storage)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder, model_dir, adapters, _ = runs
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), folder / "flat" / "adapter")
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(adapters["flat"])
    for name, weight in adapters["flat"].items():
        key = name.replace(".weight", ".default.weight")
        assert torch.equal(loaded[key].detach(), weight), name


# --- DDP: 2 gloo processes; the Trainer builds the optimizer first, then wraps the model

def _ddp_worker(rank: int, world: int, port: int, out: str):
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from torch.nn.parallel import DistributedDataParallel

    from tuneforge.testing import tiny_model
    from tuneforge.train.optim import build_optimizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        weights = {}
        for variant in ("per_tensor", "flat", "flat_built_after_ddp"):
            model = get_peft_model(tiny_model("llama", seed=0), LoraConfig(r=72, target_modules="all-linear"))
            flat = variant != "per_tensor"
            if variant == "flat_built_after_ddp":
                ddp = DistributedDataParallel(model)
            optimizer = build_optimizer(model, optim="adamw_8bit", learning_rate=1e-2, weight_decay=0.01, flat=flat)
            assert type(optimizer).__name__ == ("FlatAdamW8bit" if flat else "AdamW8bit")
            if variant != "flat_built_after_ddp":
                ddp = DistributedDataParallel(model)
            generator = torch.Generator().manual_seed(10 + rank)  # each rank its own batch
            for _ in range(3):
                ids = torch.randint(0, 317, (2, 12), generator=generator)
                ddp(input_ids=ids, labels=ids).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            weights[variant] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        gathered = [None] * world
        dist.all_gather_object(gathered, weights)
        if rank == 0:
            torch.save(gathered, out)
    finally:
        dist.destroy_process_group()


def test_ddp_flat_and_per_tensor_agree_and_ranks_stay_in_step(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # fork: the children inherit the imported modules (spawn would import torch again, seconds each).
    context = mp.get_context("fork")
    out = tmp_path / "weights.pt"
    processes = [context.Process(target=_ddp_worker, args=(rank, 2, port, str(out))) for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0, 0]
    ranks = torch.load(out)
    for name, expected in ranks[0]["per_tensor"].items():
        for rank in ranks:  # the same on every rank, flat or not, whichever was built first
            for weights in rank.values():
                assert torch.equal(weights[name], expected), name


def test_in_memory_exports_of_a_flat_trained_model_equal_a_per_tensor_trained_ones(tmp_path, one_thread):
    """The export paths that read the live model (adapter save, 16-bit merge) while its LoRA
    matrices are views into the optimizer's buffer."""
    from peft import LoraConfig, get_peft_model

    from tuneforge.export.adapter import save_adapter
    from tuneforge.export.merge import merge_model
    from tuneforge.testing import tiny_model
    from tuneforge.train.optim import build_optimizer

    def files(folder):
        return {path.name: load_file(path) for path in sorted(folder.glob("*.safetensors"))}

    exported = {}
    for flat in (True, False):
        model = get_peft_model(tiny_model("llama", seed=0), LoraConfig(r=72, target_modules="all-linear"))
        optimizer = build_optimizer(model, optim="adamw_8bit", learning_rate=1e-2, flat=flat)
        generator = torch.Generator().manual_seed(3)
        for _ in range(2):
            ids = torch.randint(0, 317, (2, 12), generator=generator)
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        exported[flat] = (files(save_adapter(model, tmp_path / f"adapter-{flat}")),
                          files(merge_model(model, tmp_path / f"merged-{flat}", dtype="float32")))
    adapter = next(iter(exported[True][0].values()))
    assert all(t.abs().min() > 0 for n, t in adapter.items() if "lora_B" in n)  # trained: B starts at 0
    for ours, theirs in zip(exported[True], exported[False]):
        assert ours.keys() == theirs.keys() and ours
        for file, tensors in theirs.items():
            assert tensors.keys() == ours[file].keys()
            for name, tensor in tensors.items():
                assert torch.equal(ours[file][name], tensor), name
