"""Resuming a run that was killed: find the last complete checkpoint, drop torn ones, rewind the log.

A checkpoint folder `checkpoint-N` (written by transformers' Trainer every `training.save_steps`)
holds the adapter, optimizer.pt, scheduler.pt, rng_state.pth and trainer_state.json. The Trainer
writes trainer_state.json last, so a folder whose trainer_state.json is missing or unreadable was
cut off mid-save (a kill, a full disk): resuming from it would fail or, worse, mix two steps.
Resuming picks the newest complete folder and removes the torn ones after it, saying so.

What makes the resumed run bit-identical to an uninterrupted one (tests/train/test_resume.py kills
a real run to prove it): the adapter and the optimiser/scheduler states are restored exactly; the
sampler's order comes from `data_seed` and the epoch, so skipping the batches already seen lands on
the same next batch; the saved CPU/CUDA RNG states are restored after that skip, so dropout draws
the same masks.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"  # written last by the Trainer: its presence marks a whole checkpoint
# One of these holds the trained weights (an adapter, or the full model when full_finetuning).
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors",
                "model.safetensors.index.json", "pytorch_model.bin")
STATE_FILES = ("optimizer.pt", "scheduler.pt")


class ResumeError(RuntimeError):
    """There is nothing to resume from; the message says what the folder holds."""


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_PATTERN.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """checkpoint-N folders in `output_dir`, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be resumed from (None: it is complete)."""
    state_file = path / TRAINER_STATE
    if not state_file.is_file():
        return f"no {TRAINER_STATE} (the save was cut off)"
    try:
        state = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{TRAINER_STATE} is truncated"
    if state.get("global_step") != checkpoint_step(path):
        return f"{TRAINER_STATE} says step {state.get('global_step')}"
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        return "no weights file"
    missing = [name for name in STATE_FILES if not (path / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    return None


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint that a run can resume from, or None."""
    for path in reversed(list_checkpoints(output_dir)):
        if checkpoint_problem(path) is None:
            return path
    return None


def prepare_resume(output_dir: str | Path) -> Path:
    """The checkpoint to resume from; removes torn checkpoints after it and rewinds log.csv to it."""
    output_dir = Path(output_dir)
    checkpoints = list_checkpoints(output_dir)
    chosen = last_complete_checkpoint(output_dir)
    if chosen is None:
        torn = "".join(f"\n  {p.name}: {checkpoint_problem(p)}" for p in checkpoints)
        raise ResumeError(
            f"--resume: no complete checkpoint in {output_dir}{torn or ' (no checkpoint-N folders)'}; "
            "run without --resume to start over (set training.save_steps to save checkpoints)"
        )
    for path in checkpoints:
        if checkpoint_step(path) > checkpoint_step(chosen):
            logger.warning("--resume: removing %s: %s", path, checkpoint_problem(path))
            shutil.rmtree(path)
    rewind_log(output_dir, checkpoint_step(chosen))
    logger.info("--resume: continuing from %s", chosen)
    return chosen


def rewind_log(output_dir: Path, step: int, name: str = "log.csv") -> None:
    """Drop log.csv rows after `step`: the killed run logged them, the resumed run logs them again."""
    path = Path(output_dir) / name
    if not path.is_file():
        return
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return
    header, body = rows[0], rows[1:]
    kept = [row for row in body if row and float(row[0]) <= step]
    if len(kept) == len(body):
        return
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *kept])
    logger.info("--resume: dropped %d log rows after step %d", len(body) - len(kept), step)
