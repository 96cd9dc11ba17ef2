"""`tuneforge plan --fit`: the largest batch (or sequence length) that fits the card, by real probe steps.

Not "halve after an OOM": two small probes give a straight line peak(x) = fixed + per_unit * x
(activations grow linearly in batch and, with checkpointing and SDPA, in sequence length), the next
candidate is where that line meets the budget, and each later probe refines the line; candidates
stay strictly between the largest size that fitted and the smallest that did not (the midpoint
when the line repeats itself). The estimate's guess is used where the measured line does not rise. A handful of probes
pins the answer to one row; every probe is one real optimizer step (two, the first allocating
the optimizer state) on random tokens of the model's vocabulary.

On the CPU there is no card to fill (host memory is shared and swaps): `fit` says so and changes
nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from tuneforge.planning.estimate import ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES, GiB

logger = logging.getLogger(__name__)

MAX_PROBES = 8


@dataclass
class FitResult:
    what: str  # "batch" or "seq"
    value: int  # the largest size that fitted (0: not even the smallest)
    budget: int
    probes: list[tuple[int, int | None]] = field(default_factory=list)  # (size, measured peak or None: OOM)

    def lines(self) -> list[str]:
        rows = [f"--fit {self.what}: probe steps (budget {self.budget / GiB:.2f} GiB allocated):"]
        for size, peak in self.probes:
            rows.append(f"  {self.what} {size:>6}: " + (f"{peak / GiB:.2f} GiB" if peak is not None else "out of memory"))
        rows.append(f"largest {self.what} that fits: {self.value}" if self.value else
                    f"no {self.what} fits: not even the smallest probe")
        return rows


def search(probe: Callable[[int], int | None], predicted: int, budget: int, *, smallest: int = 1,
           step: int = 1, largest: int = 1 << 20, max_probes: int = MAX_PROBES, what: str = "batch") -> FitResult:
    """The largest size in multiples of `step` whose probe peak stays within `budget`.

    probe(size) -> measured peak bytes, or None when it ran out of memory. predicted: the
    estimate's largest fitting size (the first candidate after `smallest`).
    """
    result = FitResult(what, 0, budget)
    fits, fails = 0, largest + step  # largest size known to fit / smallest known not to
    points: dict[int, int] = {}

    def run(size: int) -> bool:
        nonlocal fits, fails
        peak = probe(size)
        result.probes.append((size, peak))
        ok = peak is not None and peak <= budget
        if peak is not None:
            points[size] = peak
        if ok:
            fits = max(fits, size)
        else:
            fails = min(fails, size)
        return ok

    def snap(value: float) -> int:
        return max(smallest, int(value // step) * step)

    if not run(smallest) or not run(smallest + step):
        result.value = fits
        return result
    while len(result.probes) < max_probes and fails - fits > step:
        (x0, y0), (x1, y1) = sorted(points.items())[-2:]
        slope = (y1 - y0) / (x1 - x0)
        # Where the line through the two largest measured probes meets the budget; the estimate's
        # guess where the measurements show no growth.
        candidate = snap(x1 + (budget - y1) / slope) if slope > 0 else snap(predicted)
        candidate = min(max(candidate, fits + step), fails - step)
        if candidate in (size for size, _ in result.probes):
            candidate = snap((fits + fails) / 2)
            if not fits < candidate < fails:
                break
        run(candidate)
    result.value = fits
    return result


def card_budget(total: int) -> int:
    """Allocated bytes a run may reach on a card of `total` bytes: less the CUDA context and the
    caching allocator's slack."""
    return int((total - CUDA_CONTEXT_BYTES) / (1 + ALLOCATOR_SLACK))


def fit(config, plan, what: str = "batch") -> FitResult | None:
    """Probe the CUDA card for the largest batch (at the plan's sequence length) or sequence length
    (at batch 1); None on the CPU (logged)."""
    import torch

    if not torch.cuda.is_available():
        print("--fit: not applicable on the CPU (no card to fill: host memory is shared and swaps); "
              "nothing changed", flush=True)
        return None
    from tuneforge.planning import setup_for
    from tuneforge.planning.estimate import ModelFacts, estimate

    model, optimizer, vocab = _load_for_probes(config)
    total = torch.cuda.get_device_properties(0).total_memory
    budget = card_budget(total)
    facts = ModelFacts.from_config(model.config)

    def peak_for(batch: int, seq: int) -> int:
        setup = setup_for(config, plan_device(plan), plan.lengths, batch=batch, seq=seq)
        return estimate(facts, setup, plan_device(plan)).peak

    if what == "batch":
        seq = plan.setup.seq
        predicted = 1
        while predicted < 4096 and peak_for(predicted * 2, seq) <= budget:
            predicted *= 2
        while peak_for(predicted + 1, seq) <= budget:
            predicted += 1
        return search(lambda b: _probe(model, optimizer, vocab, b, seq), predicted, budget, what="batch")
    step = 256
    predicted = step
    while predicted < (1 << 20) and peak_for(1, predicted * 2) <= budget:
        predicted *= 2
    return search(lambda s: _probe(model, optimizer, vocab, 1, s), predicted, budget, smallest=step, step=step,
                  what="seq")


def plan_device(plan):
    from tuneforge.planning.estimate import DeviceSpec

    e = plan.estimate
    return DeviceSpec(e.device, e.device_memory, 0.0, 0.0, e.throughput_source)


def _load_for_probes(config):
    """The run's model as training builds it (load, kernel patches, LoRA), from the components
    FastLanguageModel composes, and its optimizer."""
    from tuneforge.lora.inject import get_peft_model
    from tuneforge.models.loader import load_model
    from tuneforge.patch import patch_model
    from tuneforge.train.optim import build_optimizer

    m, lora = config.model, config.lora
    model, _ = load_model(
        m.name, max_seq_length=m.max_seq_length, dtype=None if m.dtype == "auto" else m.dtype,
        load_in_4bit=m.load_in_4bit, load_in_8bit=m.load_in_8bit, full_finetuning=m.full_finetuning,
        use_kernels=m.use_kernels)
    patch_model(model)
    if not m.full_finetuning:
        model = get_peft_model(model, **lora.to_api(), use_kernels=m.use_kernels)
    model.train()
    optimizer = build_optimizer(model, optim=config.training.optim, learning_rate=config.training.learning_rate)
    return model, optimizer, model.config.vocab_size


def _probe(model, optimizer, vocab: int, batch: int, seq: int, steps: int = 2) -> int | None:
    """Peak allocated bytes of `steps` training steps on [batch, seq] random tokens; None on OOM."""
    import torch

    from tuneforge.device import default_compute_dtype

    optimizer.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        ids = torch.randint(0, vocab, (batch, seq), device="cuda")
        for _ in range(steps):
            with torch.autocast("cuda", dtype=default_compute_dtype()):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    except torch.OutOfMemoryError:
        peak = None
    finally:
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    logger.info("probe %d x %d: %s", batch, seq, "OOM" if peak is None else f"{peak / GiB:.2f} GiB")
    return peak
