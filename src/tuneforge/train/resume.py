"""Resuming a run that was killed: find the last complete checkpoint, drop torn ones, rewind the log.

A checkpoint folder `checkpoint-N` (written by transformers' Trainer every `training.save_steps`)
holds the adapter, optimizer.pt, scheduler.pt, rng_state.pth and trainer_state.json. The Trainer
writes trainer_state.json last, so a folder whose trainer_state.json is missing or unreadable was
cut off mid-save (a kill, a full disk): resuming from it would fail or, worse, mix two steps.
Resuming picks the newest complete folder and removes the torn ones after it, saying so.

Complete means more than present: `checkpoint_problem` reads every weights and state file's
structure (a safetensors header and its data length, a torch zip archive's checksums) and, where
the checkpoint carries a manifest (MANIFEST, written by `AtomicCheckpoints` before the folder is
renamed into place), each file's size and sha256. A damaged newest checkpoint makes the run fall
back to the newest complete one, with a line saying so. A checkpoint whose manifest records
another run (other config keys, data or model: `run_folder.differences`) is refused unless the
caller allows changes.

`AtomicCheckpoints` (a Trainer mixin) writes checkpoint-N into a staging sibling and renames it
into place, so a kill or a full disk mid-save leaves no half checkpoint behind.

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

from tuneforge.atomic import (atomic_write_text, file_problem, fsync_tree, remove, sha256_of, staging_path,
                             swap_into_place)

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"  # written last by the Trainer: its presence marks a whole checkpoint
# One of these holds the trained weights (an adapter, or the full model when full_finetuning).
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors",
                "model.safetensors.index.json", "pytorch_model.bin")
STATE_FILES = ("optimizer.pt", "scheduler.pt")
MANIFEST = "tuneforge_checkpoint.json"  # files, sizes, sha256 and the run's identity; written last


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


def checkpoint_problem(path: Path, deep: bool = True) -> str | None:
    """Why `path` cannot be resumed from (None: it is complete).

    deep: also read every weights / state file's structure and check the manifest's sizes and
    hashes (a second or so per GB); without it, only which files are there.
    """
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
    if not deep:
        return None
    manifest = read_manifest(path)
    if manifest is not None:
        for name, expected in manifest.get("files", {}).items():
            file = path / name
            if not file.is_file():
                return f"{name} is missing (the manifest lists it)"
            size = file.stat().st_size
            if size != expected["size"]:
                return f"{name} is truncated or changed ({size} bytes, written with {expected['size']})"
            if sha256_of(file) != expected["sha256"]:
                return f"{name} changed since it was written (sha256 differs)"
    for file in sorted(path.iterdir()):
        problem = file_problem(file)
        if problem:
            return problem
    return None


def read_manifest(path: Path) -> dict | None:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def write_manifest(path: Path, identity: dict | None) -> None:
    """Record every file of checkpoint `path` (size, sha256) and the run that wrote it."""
    files = {str(f.relative_to(path)): {"size": f.stat().st_size, "sha256": sha256_of(f)}
             for f in sorted(path.rglob("*")) if f.is_file() and f.name != MANIFEST}
    atomic_write_text(path / MANIFEST, json.dumps({"step": checkpoint_step(path), "files": files,
                                                   "identity": identity}, indent=1), fsync=False)


def last_complete_checkpoint(output_dir: str | Path, deep: bool = True) -> Path | None:
    """The newest checkpoint that a run can resume from, or None."""
    for path in reversed(list_checkpoints(output_dir)):
        if checkpoint_problem(path, deep=deep) is None:
            return path
    return None


def prepare_resume(output_dir: str | Path, identity: dict | None = None, allow_changes: bool = False,
                   max_steps: int | None = None, tidy: bool = True) -> Path:
    """The checkpoint to resume from; removes damaged checkpoints after it and rewinds log.csv to it.

    identity: this run's (`run_folder.run_identity`); a checkpoint (or, for checkpoints without a
      manifest, a folder) written by a run with another identity is refused unless `allow_changes`.
    max_steps: refuse a checkpoint past it (the run would end at once and save the checkpoint's
      adapter over the run's newer one).
    tidy: remove the damaged checkpoints and rewind log.csv (the main process of a distributed run).
    """
    from tuneforge.train.run_folder import differences, identity_of_folder

    output_dir = Path(output_dir)
    checkpoints = list_checkpoints(output_dir)
    problems: dict[Path, str] = {}
    chosen = None
    for path in reversed(checkpoints):
        problem = checkpoint_problem(path)
        if problem is None:
            chosen = path
            break
        problems[path] = problem
    if chosen is None:
        torn = "".join(f"\n  {p.name}: {problems[p]}" for p in checkpoints)
        raise ResumeError(
            f"--resume: no complete checkpoint in {output_dir}{torn or ' (no checkpoint-N folders)'}; "
            "run without --resume to start over (set training.save_steps to save checkpoints)"
        )
    if identity is not None:
        manifest = read_manifest(chosen)
        recorded = manifest.get("identity") if manifest else None
        written_by = recorded if recorded is not None else identity_of_folder(output_dir)
        changed = differences(written_by, identity) if written_by is not None else []
        if changed and not allow_changes:
            raise ResumeError(
                f"--resume: {chosen} was written by a run with another config, data or model:\n  "
                + "\n  ".join(changed)
                + "\nResuming would mix two runs. Put the config back, or pass --allow-changes to continue anyway "
                "(or --overwrite to start over)")
        for line in changed:
            logger.warning("--resume --allow-changes: %s; the resumed run will not match an uninterrupted one", line)
    step = checkpoint_step(chosen)
    if max_steps is not None and max_steps > 0 and step > max_steps:
        raise ResumeError(f"--resume: {chosen.name} is past training.max_steps={max_steps}; raise max_steps to "
                          "continue it (resuming would end at once and replace the adapter with this older state)")
    if problems:
        newest = max(problems, key=checkpoint_step)
        logger.warning("--resume: %s is damaged (%s); falling back to %s, the newest complete checkpoint",
                       newest.name, problems[newest], chosen.name)
    if tidy:
        for path in checkpoints:
            if checkpoint_step(path) > step:
                logger.warning("--resume: removing %s: %s", path, problems.get(path) or checkpoint_problem(path))
                shutil.rmtree(path)
        rewind_log(output_dir, step)
    logger.info("--resume: continuing from %s", chosen)
    return chosen


class AtomicCheckpoints:
    """Trainer mixin: checkpoint-N is written whole or not at all.

    The Trainer writes the checkpoint into `<output>/.checkpoint-N.tmp-<pid>-<random>/checkpoint-N`;
    then the manifest (files, sizes, sha256, `run_identity`) is added and the folder is renamed to
    `<output>/checkpoint-N`. A kill or a full disk during the save leaves the earlier checkpoints
    as they were and a staging folder that the next writer removes. Multi-process runs (every rank
    writes its own RNG state into the folder) save in place, as the Trainer does, and rank 0 adds
    the manifest after all ranks are done.
    """

    run_identity: dict | None = None
    _checkpoint_staging: Path | None = None

    def _get_output_dir(self, trial):
        if self._checkpoint_staging is not None:
            return str(self._checkpoint_staging)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        import torch

        run_dir = Path(self._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        if self.args.world_size > 1:
            super()._save_checkpoint(model, trial)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.barrier()
            if self.args.should_save:
                write_manifest(run_dir / name, self.run_identity)
            return
        parent = staging_path(run_dir / name)
        parent.mkdir(parents=True)
        self._checkpoint_staging = parent
        try:
            super()._save_checkpoint(model, trial)
            staged = parent / name
            best = self.state.best_model_checkpoint
            if best is not None and Path(best).parent == parent:
                # The Trainer named the best checkpoint by where it wrote it; it is going to live here.
                self.state.best_model_checkpoint = str(run_dir / Path(best).name)
                self.state.save_to_json(str(staged / TRAINER_STATE))
            write_manifest(staged, self.run_identity)
            fsync_tree(staged)
            swap_into_place(staged, run_dir / name)
        finally:
            self._checkpoint_staging = None
            remove(parent)
        if self.args.save_total_limit:
            from transformers.trainer_utils import rotate_checkpoints

            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)


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
