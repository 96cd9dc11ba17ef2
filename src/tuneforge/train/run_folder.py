"""A run folder belongs to one run: what a second run into it, or a resumed run, may do.

    claim = claim_output_dir(config, resume=False, overwrite=False)   # before any model loads
    ...                                                               # train
    claim.release()

- An empty (or missing) folder is taken. A folder that holds an earlier run is refused, naming what
  it holds, unless `resume` (continue that run, see `resume.prepare_resume`) or `overwrite` (remove
  that run's files, and only those: RUN_ENTRIES). Files that no run wrote (the user's own) are never
  removed: such a folder is refused even with `overwrite`.
- The output folder may not be the data folder, lie inside it (the next run would read log.csv and
  the checkpoints' JSON files as training rows), or be the model folder.
- While a run writes into a folder it holds an exclusive lock (`.tuneforge.lock`), so a second
  process (another `train`, or a `--resume` typed while the first still runs) is refused instead of
  interleaving checkpoints with it.

The run's identity (`run_identity`: the config less the keys a resumed run may change, and the
content of its data and model files) goes into config.resolved.json and every checkpoint, so a
resumed run can tell a checkpoint written with other data, learning rate or model (`differences`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tuneforge.atomic import sha256_of
from tuneforge.config import DEFAULT_DATASET, DEFAULT_HELDOUT, RENAMED_KEYS, TrainConfig
from tuneforge.train.resume import CHECKPOINT_PATTERN, ResumeError

logger = logging.getLogger(__name__)

LOCK_NAME = ".tuneforge.lock"
RESOLVED_CONFIG_NAME = "config.resolved.json"
# What `tuneforge train` writes into its folder (besides checkpoint-N and the atomic writers'
# `.<name>.tmp-*` / `.<name>.old-*` siblings); --overwrite removes these and nothing else.
RUN_ENTRIES = (RESOLVED_CONFIG_NAME, "summary.json", "log.csv", "loss.png", "adapter", "tensorboard",
               "runs", LOCK_NAME, "data_report.json", "data_lengths.png", "plan.json")
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
MODEL_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
# Keys a resumed run may change without changing what the finished steps computed.
RESUMABLE_CHANGES = frozenset({
    "training.max_steps", "training.num_train_epochs", "training.save_steps", "training.save_total_limit",
    "training.logging_steps", "training.report_to", "training.output_dir",
})


class RunFolderError(ResumeError):
    """The output folder cannot be used for this run; the message says why and what to pass."""


def _is_run_entry(name: str, folder: Path | None = None) -> bool:
    if name == "README.md" and folder is not None:
        return _is_trainer_model_card(folder / name)
    return (name in RUN_ENTRIES or CHECKPOINT_PATTERN.match(name) is not None
            or (name.startswith(".") and (".tmp-" in name or ".old-" in name)))


def _is_trainer_model_card(path: Path) -> bool:
    """TRL writes a model card README.md into the output folder with each checkpoint; a README
    of the user's own is not ours to remove."""
    try:
        head = path.read_text(errors="replace")[:400]
    except OSError:
        return False
    return head.startswith("---") and "generated_from_trainer" in head


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _local_path(name: str) -> Path | None:
    path = Path(name).expanduser()
    return path.resolve() if path.exists() else None


def check_not_an_input(config: TrainConfig, output_dir: Path) -> None:
    """Refuse an output folder that is (or is inside) the data folder, or is the model folder."""
    out = output_dir.expanduser().resolve()
    data = _local_path(config.data.path)
    # (A data *file* in the output folder is one of the user's files: the check for those refuses it.)
    if data is not None and data.is_dir() and _inside(out, data):
        raise RunFolderError(
            f"training.output_dir {output_dir} is inside the data folder {config.data.path}: a later run would "
            "read this run's log.csv and checkpoint files as training rows; choose a folder outside it")
    model = _local_path(config.model.name)
    if model is not None and model.is_dir() and _inside(out, model):
        raise RunFolderError(f"training.output_dir {output_dir} is the model folder {config.model.name} (or inside "
                             "it); choose another folder, so the model's own files stay as they are")


@dataclass
class Claim:
    """The output folder, held for one run (see the module docstring)."""

    output_dir: Path
    lock_handle: object | None = None

    def release(self) -> None:
        if self.lock_handle is not None:
            _unlock(self.lock_handle)
            self.lock_handle = None


def _lock(folder: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the other checks still hold
        return None
    handle = open(folder / LOCK_NAME, "a+")  # noqa: SIM115 - held open for the run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise RunFolderError(f"{folder} is in use by another tuneforge run (process {holder}); wait for it to "
                             "finish or choose another --output") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _unlock(handle) -> None:
    import fcntl

    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()


def _holds_work(folder: Path, entries: list[str]) -> bool:
    """True if an earlier run left anything worth keeping: an adapter, a checkpoint, a summary,
    logged steps. A run stopped while the model loaded leaves only config.resolved.json."""
    for name in entries:
        if name in ("adapter", "summary.json", "tensorboard", "runs") or CHECKPOINT_PATTERN.match(name):
            return True
        if name == "log.csv":
            with (folder / name).open() as handle:
                if sum(1 for _ in handle) > 1:
                    return True
    return False


def describe_run(folder: Path, entries: list[str]) -> str:
    """'adapter/, 4 checkpoints (checkpoint-1 ... checkpoint-4), log.csv, ... (4 steps done)'."""
    checkpoints = sorted((n for n in entries if CHECKPOINT_PATTERN.match(n)),
                         key=lambda n: int(CHECKPOINT_PATTERN.match(n).group(1)))
    shown = [f"{name}/" if (folder / name).is_dir() else name for name in entries
             if not name.startswith(".") and name not in checkpoints]
    if len(checkpoints) == 1:
        shown.append(checkpoints[0])
    elif checkpoints:
        shown.append(f"{len(checkpoints)} checkpoints ({checkpoints[0]} ... {checkpoints[-1]})")
    text = ", ".join(sorted(shown))
    try:
        steps = json.loads((folder / "summary.json").read_text()).get("steps")
        text += f" ({steps} steps done)" if steps else ""
    except (OSError, ValueError):
        pass
    return text


def claim_output_dir(config: TrainConfig, *, resume: bool = False, overwrite: bool = False,
                     main_process: bool = True) -> Claim:
    """Take `config.training.output_dir` for this run, or raise RunFolderError saying why not.

    main_process: only the main process of a distributed run checks, clears and locks the folder.
    """
    output_dir = Path(config.training.output_dir)
    if not main_process:
        return Claim(output_dir)
    check_not_an_input(config, output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise RunFolderError(f"training.output_dir {output_dir} is a file, not a folder")
    ours = _check_entries(output_dir, resume, overwrite)  # before the lock: a refused folder gets no lock file
    output_dir.mkdir(parents=True, exist_ok=True)
    claim = Claim(output_dir, _lock(output_dir))
    try:
        ours = _check_entries(output_dir, resume, overwrite)  # again: the folder is ours only from here
        if ours and overwrite:
            logger.warning("--overwrite: removing the earlier run in %s: %s", output_dir,
                           describe_run(output_dir, ours))
            for name in ours:
                path = output_dir / name
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        return claim
    except BaseException:
        claim.release()
        raise


def _check_entries(output_dir: Path, resume: bool, overwrite: bool) -> list[str]:
    """The earlier run's entries in `output_dir` that `overwrite` removes ([] when there is no
    work to keep); raises RunFolderError for a folder this run may not take."""
    if not output_dir.is_dir():
        return []
    entries = sorted(p.name for p in output_dir.iterdir() if p.name != LOCK_NAME)
    ours = [name for name in entries if _is_run_entry(name, output_dir)]
    foreign = [name for name in entries if not _is_run_entry(name, output_dir)]
    if resume:
        return []
    if foreign:
        raise RunFolderError(
            f"training.output_dir {output_dir} holds files that no tuneforge run wrote ({', '.join(foreign[:5])}"
            f"{' ...' if len(foreign) > 5 else ''}); a run needs a folder of its own: choose an empty or new one")
    if ours and not _holds_work(output_dir, ours):
        logger.info("%s holds only the set-up of a run that never trained a step (%s): reusing it",
                    output_dir, ", ".join(ours))
        return ours
    if ours and not overwrite:
        raise RunFolderError(
            f"training.output_dir {output_dir} already holds a run: {describe_run(output_dir, ours)}. "
            "Pass --resume to continue it, --overwrite to replace it, or choose another --output")
    return ours


# ---------------------------------------------------------------------------------------------
# The run's identity
# ---------------------------------------------------------------------------------------------


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and key != "field_map":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def data_fingerprint(path: str) -> dict:
    """{file name: sha256} of the data files a run reads (the shipped set's own file for its names);
    {} for a Hub dataset, whose content cannot be checked here."""
    if path in (DEFAULT_DATASET, DEFAULT_HELDOUT):
        from tuneforge.data.sources import default_dataset_path

        return {path: sha256_of(default_dataset_path())}
    local = _local_path(path)
    if local is None:
        return {}
    if local.is_file():
        return {local.name: sha256_of(local)}
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
                   and not p.name.startswith("."))
    return {str(p.relative_to(local)): sha256_of(p) for p in files}


def model_fingerprint(name: str) -> dict:
    """A local model folder's config.json hash and weight file sizes (hashing gigabytes of weights
    on every resume would cost minutes; a different model has a different config or sizes)."""
    local = _local_path(name)
    if local is None or not local.is_dir():
        return {}
    found = {}
    if (local / "config.json").is_file():
        found["config.json"] = sha256_of(local / "config.json")
    for path in sorted(local.iterdir()):
        if path.is_file() and path.suffix in MODEL_WEIGHT_SUFFIXES:
            found[path.name] = path.stat().st_size
    return found


def run_identity(config: TrainConfig) -> dict:
    """What makes two runs the same run: config keys (less RESUMABLE_CHANGES), data and model content."""
    flat = _flatten(config.to_dict())
    return {"config": {key: value for key, value in flat.items() if key not in RESUMABLE_CHANGES},
            "data": data_fingerprint(config.data.path), "model": model_fingerprint(config.model.name)}


def differences(before: dict, now: dict) -> list[str]:
    """Human lines for what differs between two run identities."""
    lines = []
    old_config, new_config = before.get("config", {}), now.get("config", {})
    for key in sorted(set(old_config) | set(new_config)):
        if key in RESUMABLE_CHANGES:
            continue
        if old_config.get(key) != new_config.get(key):
            lines.append(f"{key}: {old_config.get(key)!r} -> {new_config.get(key)!r}")
    for part, what in (("data", "data file"), ("model", "model file")):
        old, new = before.get(part), now.get(part)
        if old is None or new is None or old == new:
            continue
        changed = sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name))
        lines.append(f"{part}: {what}s changed since the run started ({', '.join(changed[:5])})")
    return lines


def read_resolved(output_dir: Path) -> dict | None:
    path = Path(output_dir) / RESOLVED_CONFIG_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def identity_of_folder(output_dir: Path) -> dict | None:
    """The identity config.resolved.json records (older folders: their config alone)."""
    resolved = read_resolved(output_dir)
    if resolved is None:
        return None
    if "identity" in resolved:
        identity = dict(resolved["identity"])
        if isinstance(identity.get("config"), dict):
            # Folders written before the lora keys took the API's names (lora.alpha -> lora.lora_alpha).
            identity["config"] = {RENAMED_KEYS.get(key, key): value for key, value in identity["config"].items()}
        return identity
    flat = _flatten(resolved.get("config", {}))
    return {"config": {RENAMED_KEYS.get(key, key): value for key, value in flat.items() if key not in RESUMABLE_CHANGES}}
