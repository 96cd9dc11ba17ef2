"""`tuneforge plan`: what a run will need, before a weight is loaded onto the GPU.

    from tuneforge.planning import plan_config
    plan = plan_config(load_config("run.yaml"))
    print("\\n".join(plan.lines()))

From the config: the model's config.json (its shapes, on the meta device), the tokenizer and the
dataset's token lengths (the data is tokenized exactly as `train` will), and the detected device,
into an `estimate.Estimate` of peak memory and time. `fit.fit_batch` then finds the largest batch
that fits a CUDA card with a few real probe steps.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.planning.estimate import GPU_TABLE, DeviceSpec, Estimate, ModelFacts, RunSetup, estimate, \
    utilisation_for

logger = logging.getLogger(__name__)

PLAN_NAME = "plan.json"


def detect_device() -> DeviceSpec:
    """The CUDA card (its name looked up in the throughput table) or the CPU (a matmul probe)."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        memory = torch.cuda.get_device_properties(0).total_memory
        peak = next((flops for key, flops in sorted(GPU_TABLE.items(), key=lambda kv: -len(kv[0]))
                     if key.lower() in name.lower()), None)
        source = "data-sheet bf16 throughput x bench utilisation"
        if peak is None:
            peak, source = 100e12, f"{name} not in the table: 100 TFLOP/s assumed"
        return DeviceSpec(name, memory, peak, 0.0, source)
    return DeviceSpec(f"CPU ({torch.get_num_threads()} threads)", _host_memory(), cpu_matmul_flops(), 0.0,
                      "fp32 matmul probe on this CPU")


def cpu_matmul_flops(size: int = 512, trials: int = 7) -> float:
    """fp32 matmul FLOP/s of this CPU with torch's current threads: the best of a few ~10 ms trials
    (on a shared machine single trials vary 2-3x with the neighbours' load; the best is stable)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / max(best, 1e-9)


def _host_memory() -> int:
    return _kib_field("/proc/meminfo", "MemTotal:")


def _process_rss() -> int:
    return _kib_field(f"/proc/{os.getpid()}/status", "VmRSS:")


def _kib_field(path: str, key: str) -> int:
    """Bytes of a "<key> <n> kB" line of a /proc file (0 where there is none: not Linux)."""
    try:
        with open(path) as lines:
            for line in lines:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class Lengths:
    """Token lengths of the prepared training rows (after the overlong policy)."""

    rows: int
    lengths: list[int] = field(repr=False)
    packed: bool = False

    def percentile(self, p: float) -> int:
        ordered = sorted(self.lengths)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]

    def percentiles(self) -> dict[str, int]:
        return {f"p{p}": self.percentile(p) for p in (50, 90, 99, 100)}

    def padded_row_mean(self, batch: int, samples: int = 256, seed: int = 0) -> float:
        """Mean tokens per row when random batches of `batch` rows are padded to their longest."""
        rng = random.Random(seed)
        if batch <= 1 or len(self.lengths) <= 1:
            return sum(self.lengths) / max(len(self.lengths), 1)
        draws = [max(rng.sample(self.lengths, min(batch, len(self.lengths)))) for _ in range(samples)]
        return sum(draws) / len(draws)


@dataclass
class RunPlan:
    model: str
    family: str
    setup: RunSetup
    estimate: Estimate
    lengths: Lengths | None

    def lines(self) -> list[str]:
        e = self.estimate
        head = [f"plan: {self.model} ({self.family}), {e.total_params / 1e6:,.1f}M parameters, "
                f"{e.trainable_params:,} trainable, {self.setup.quant}, checkpointing "
                f"{self.setup.checkpointing or 'off'}, kernels {'on' if self.setup.kernels else 'off'}"]
        if self.lengths is not None:
            pct = self.lengths.percentiles()
            head.append(f"data: {self.lengths.rows} rows, tokens per row p50 {pct['p50']}, p90 {pct['p90']}, "
                        f"p99 {pct['p99']}, max {pct['p100']}" + (" (packed rows)" if self.lengths.packed else ""))
        return head + e.lines()

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {"model": self.model, "family": self.family, "setup": asdict(self.setup),
                "estimate": self.estimate.to_dict(),
                "lengths": self.lengths.percentiles() if self.lengths is not None else None}

    def write(self, path: str | Path) -> Path:
        """The plan as JSON at `path` (a folder: <path>/plan.json)."""
        import json

        path = Path(path)
        if path.is_dir():
            path = path / PLAN_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


def setup_for(config, device: DeviceSpec, lengths: Lengths | None, batch: int | None = None,
              seq: int | None = None) -> RunSetup:
    """The estimate's view of a TrainConfig on `device` (batch / seq override the config's)."""
    from tuneforge.patch.activation_checkpointing import resolve_mode

    m, lora, t = config.model, config.lora, config.training
    cuda = not device.name.startswith("CPU")
    quant = "full" if m.full_finetuning else "nf4" if m.load_in_4bit else "int8" if m.load_in_8bit else "16bit"
    dtype = {"float32": 4, "bfloat16": 2, "float16": 2}.get(m.dtype, 2 if cuda else 4)
    batch = batch or t.per_device_train_batch_size
    if config.data.packing or lengths is None:
        peak_seq, mean_seq = m.max_seq_length, float(m.max_seq_length)
        if lengths is not None and lengths.lengths:
            mean_seq = sum(lengths.lengths) / len(lengths.lengths)
    else:
        peak_seq = min(max(lengths.lengths), m.max_seq_length)
        mean_seq = min(lengths.padded_row_mean(batch), peak_seq)
    if seq is not None:
        peak_seq, mean_seq = seq, min(mean_seq, seq)
    targets = (lora.target_modules,) if isinstance(lora.target_modules, str) else tuple(lora.target_modules)
    kernels = m.use_kernels if m.use_kernels is not None else cuda
    return RunSetup(
        batch=batch, seq=peak_seq, mean_seq=mean_seq, quant=quant, compute_bytes=dtype, lora_r=lora.r,
        target_modules=targets, modules_to_save=tuple(lora.modules_to_save or ()),
        checkpointing=resolve_mode(lora.use_gradient_checkpointing), optim=t.optim, kernels=bool(kernels),
        device="cuda" if cuda else "cpu", grad_accum=t.gradient_accumulation_steps,
    )


def _steps(config, rows: int | None) -> int:
    t = config.training
    if t.max_steps > 0:
        return t.max_steps
    if not rows:
        return 0
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps
    return math.ceil(math.ceil(rows / per_step) * t.num_train_epochs)


def model_source(config) -> tuple[str, object]:
    """(local folder or Hub id, transformers config) of config.model.name, without loading weights."""
    from transformers import AutoConfig

    from tuneforge.models.loader import ModelLoadError, _hub_error, resolve_source

    source = resolve_source(config.model.name, config.model.load_in_4bit)
    try:
        return source.path, AutoConfig.from_pretrained(source.path)
    except (OSError, ValueError) as error:
        if source.hub:
            raise _hub_error(source, error) from None
        raise ModelLoadError(f"{source.path}: could not read config.json: {error}") from None


def dataset_lengths(config, tokenizer) -> Lengths:
    """Tokenize the training data as `train` will (template, masking, overlong policy)."""
    from tuneforge.data.sources import build_datasets

    train, _ = build_datasets(config, tokenizer, config.data.chat_template)
    if config.data.packing and "seq_lengths" in train.column_names:
        return Lengths(len(train), [len(ids) for ids in train["input_ids"]], packed=True)
    return Lengths(len(train), [len(ids) for ids in train["input_ids"]])


def plan_config(config, *, tokenizer=None, lengths: Lengths | None = None, device: DeviceSpec | None = None,
                with_data: bool = True) -> RunPlan:
    """The plan of a TrainConfig: model shapes from its config.json, the dataset's lengths, the device.

    tokenizer / lengths: pass them when already at hand (train does); otherwise the tokenizer is
    read from the model folder and the data tokenized here (with_data=False skips the data and
    assumes rows of max_seq_length).
    """
    from tuneforge.models.families import family_for_model_type

    path, model_config = model_source(config)
    facts = ModelFacts.from_config(model_config)
    if lengths is None and with_data:
        if tokenizer is None:
            from transformers import AutoTokenizer

            from tuneforge.models.loader import fix_tokenizer

            tokenizer = fix_tokenizer(AutoTokenizer.from_pretrained(path))
            tokenizer.model_max_length = config.model.max_seq_length
        lengths = dataset_lengths(config, tokenizer)
    device = device or detect_device()
    setup = setup_for(config, device, lengths)
    device.utilisation = utilisation_for(facts.total_params, setup.device)
    result = estimate(facts, setup, device, steps=_steps(config, lengths.rows if lengths else None))
    if setup.device == "cpu":
        result.overhead = _process_rss()  # torch, transformers and Python already resident
        result.overhead_label = "+ process (libraries)"
    spec = family_for_model_type(facts.model_type)
    return RunPlan(config.model.name, spec.name if spec else facts.model_type, setup, result, lengths)


__all__ = ["DeviceSpec", "Estimate", "Lengths", "ModelFacts", "RunPlan", "RunSetup", "detect_device",
           "estimate", "plan_config"]


def plan_model(model_name: str, *, max_seq_length: int = 2048, load_in_4bit: bool = True, load_in_8bit: bool = False,
               full_finetuning: bool = False, r: int = 16, target_modules=None, use_gradient_checkpointing="unsloth",
               batch_size: int = 2, gradient_accumulation_steps: int = 1, optim: str = "adamw_8bit",
               max_steps: int = 60, dataset: str | None = None, chat_template: str | None = None) -> RunPlan:
    """The plan in FastLanguageModel's terms (`FastLanguageModel.plan`). dataset: a data path (or
    "tuneforge:default"), tokenized for its lengths; None assumes rows of max_seq_length."""
    from tuneforge.config import config_from_dict

    values = {
        "model": {"name": model_name, "max_seq_length": max_seq_length, "load_in_4bit": load_in_4bit,
                  "load_in_8bit": load_in_8bit, "full_finetuning": full_finetuning},
        "lora": {"r": r, "use_gradient_checkpointing": use_gradient_checkpointing},
        "training": {"per_device_train_batch_size": batch_size, "optim": optim, "max_steps": max_steps,
                     "gradient_accumulation_steps": gradient_accumulation_steps},
    }
    if target_modules is not None:
        values["lora"]["target_modules"] = target_modules
    if dataset is not None:
        values["data"] = {"path": dataset, "chat_template": chat_template}
    return plan_config(config_from_dict(values), with_data=dataset is not None)
