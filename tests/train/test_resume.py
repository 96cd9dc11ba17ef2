"""`tuneforge train --resume`: a run killed with SIGKILL and resumed ends with the adapter of an
uninterrupted run, bit for bit (CPU); torn checkpoints are skipped; the log reads as one run."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_chat_model import save_tiny_chat_model

from tuneforge.train.resume import ResumeError, checkpoint_problem, last_complete_checkpoint, prepare_resume
from tuneforge.data.sources import default_rows

SAVE_STEPS = 4
MAX_STEPS = 16
ADAPTER = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def run_config(tmp_path_factory):
    """A YAML config: tiny Llama in NF4, 12 rows (6 steps an epoch, so the run crosses two epoch
    boundaries), LoRA dropout on (its RNG must resume too), the default 8-bit AdamW."""
    folder = tmp_path_factory.mktemp("resume")
    model_dir = save_tiny_chat_model(folder / "model")
    data = folder / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in default_rows("train")[:12]))
    config = {
        # Kernels off: under the Triton interpreter they cost seconds a step on this CPU; what is
        # tested here is the checkpoint / RNG / data-order machinery around them.
        "model": {"name": str(model_dir), "load_in_4bit": True, "max_seq_length": 256, "use_kernels": False},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1, "gradient_checkpointing": False},
        "data": {"path": str(data)},
        "training": {"max_steps": MAX_STEPS, "save_steps": SAVE_STEPS, "per_device_train_batch_size": 2,
                     "learning_rate": 1e-3, "warmup_steps": 2, "optim": "adamw_8bit", "report_to": "none"},
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _train_command(config: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tuneforge.cli", "train", str(config), "--output", str(output), *extra]


def _env():
    # One thread in every run: the reduction order (and so the last bit) depends on the thread count;
    # one thread also avoids OpenMP spin-waits on a shared 2-core machine.
    return dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1", HF_HUB_OFFLINE="1")


def _wait_for_checkpoint(process, folder: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while checkpoint_problem(folder) is not None:
        if process.poll() is not None:
            raise AssertionError(f"the run ended (code {process.returncode}) before {folder.name} was saved")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"no {folder.name} after {timeout} s")
        time.sleep(0.005)


def test_killed_and_resumed_run_ends_bit_identical_to_an_uninterrupted_run(run_config, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # The uninterrupted run and the run to kill go side by side (one thread each).
    reference = subprocess.Popen(_train_command(run_config, straight), env=_env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    victim = subprocess.Popen(_train_command(run_config, killed), env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    _wait_for_checkpoint(victim, killed / f"checkpoint-{2 * SAVE_STEPS}")  # step 8: in the second epoch
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert not (killed / "adapter").exists(), "the run finished before the kill; nothing was tested"

    # A kill during a save leaves a folder without trainer_state.json: make sure there is one.
    last = last_complete_checkpoint(killed)
    torn = killed / f"checkpoint-{int(last.name.split('-')[1]) + SAVE_STEPS}"
    if not torn.exists():
        shutil.copytree(last, torn)
        (torn / "trainer_state.json").unlink()

    resumed = subprocess.run(_train_command(run_config, killed, "--resume"), env=_env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"removing {torn}" in resumed.stderr and f"continuing from {last}" in resumed.stderr
    output, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, output[-3000:]

    expected = load_file(straight / "adapter" / ADAPTER)
    got = load_file(killed / "adapter" / ADAPTER)
    assert expected.keys() == got.keys() and len(expected) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    # Training really went on after the checkpoint it resumed from.
    at_kill = load_file(last / ADAPTER)
    assert any(not torch.equal(at_kill[name], got[name]) for name in got)
    # The log reads as one run: rows the killed run wrote after its checkpoint were dropped and
    # redone; losses, learning rates, gradient norms and token counts are the uninterrupted run's.
    assert _deterministic_log(killed) == _deterministic_log(straight)
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["steps"] == MAX_STEPS and summary["resumed_at_step"] == int(last.name.split("-")[1])


def _deterministic_log(folder: Path) -> list[dict]:
    """log.csv less its wall-clock columns (throughput and memory differ between any two runs)."""
    import csv

    with (folder / "log.csv").open(newline="") as handle:
        return [{key: value for key, value in row.items() if key not in ("tokens_per_second", "memory_gib")}
                for row in csv.DictReader(handle)]


def _fake_checkpoint(folder: Path, step: int, *, tear: str | None = None) -> Path:
    from safetensors.torch import save_file

    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if tear != "no adapter_model.safetensors":
        save_file({"lora_A": torch.ones(2, 3)}, path / "adapter_model.safetensors")
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        if tear != f"no {name}":
            torch.save({"step": step}, path / name)
    state = json.dumps({"global_step": step, "log_history": []})
    if tear == "truncated state":
        (path / "trainer_state.json").write_text(state[: len(state) // 2])
    elif tear != "no state":
        (path / "trainer_state.json").write_text(state)
    return path


@pytest.mark.parametrize("tear, reason", [
    ("no state", "no trainer_state.json"),
    ("truncated state", "trainer_state.json is truncated"),
    ("no adapter_model.safetensors", "no weights file"),
    ("no optimizer.pt", "missing optimizer.pt"),
])
def test_resume_skips_a_torn_checkpoint_and_rewinds_the_log(tmp_path, caplog, tear, reason):
    good = _fake_checkpoint(tmp_path, 4)
    torn = _fake_checkpoint(tmp_path, 8, tear=tear)
    assert checkpoint_problem(torn).startswith(reason)
    (tmp_path / "log.csv").write_text("step,loss\n" + "".join(f"{s},{s / 10}\n" for s in range(1, 10)))
    with caplog.at_level(logging.INFO):
        assert prepare_resume(tmp_path) == good
    assert not torn.exists() and f"removing {torn}: {reason}" in caplog.text
    assert (tmp_path / "log.csv").read_text() == "step,loss\n" + "".join(f"{s},{s / 10}\n" for s in range(1, 5))


def test_resume_with_nothing_to_resume_from_says_so(tmp_path, run_config, capsys):
    from tuneforge.cli import main

    with pytest.raises(ResumeError, match=r"no complete checkpoint in .*\(no checkpoint-N folders\)"):
        prepare_resume(tmp_path)
    _fake_checkpoint(tmp_path, 2, tear="no state")
    assert main(["train", str(run_config), "--output", str(tmp_path), "--resume"]) == 2
    error = capsys.readouterr().err
    assert "no complete checkpoint" in error and "checkpoint-2: no trainer_state.json" in error


def test_resume_names_config_changes_that_break_exactness():
    from tuneforge.config import TrainConfig
    from tuneforge.train.run_folder import differences, run_identity

    before, now = TrainConfig(), TrainConfig()
    now.training.learning_rate, now.training.max_steps = 1e-3, 500
    changed = differences(run_identity(before), run_identity(now))
    assert changed == ["training.learning_rate: 0.0002 -> 0.001"]  # extending a run is what resuming is for


def test_a_run_folder_written_with_the_old_lora_keys_still_resumes_as_the_same_run(tmp_path):
    """Folders from before the lora keys took the API's names record lora.alpha / lora.dropout /
    lora.gradient_checkpointing; read back, their identity uses the new names, so --resume does not
    report them as changed."""
    import json

    from tuneforge.config import RENAMED_KEYS, TrainConfig
    from tuneforge.train.run_folder import RESOLVED_CONFIG_NAME, identity_of_folder, run_identity

    config = TrainConfig()
    config.training.output_dir = str(tmp_path)
    identity = run_identity(config)
    old = {"config": {({v: k for k, v in RENAMED_KEYS.items()}).get(key, key): value
                      for key, value in identity["config"].items()}}
    old.update({k: v for k, v in identity.items() if k != "config"})
    assert set(old["config"]) != set(identity["config"])  # the old folder really holds the old names
    (tmp_path / RESOLVED_CONFIG_NAME).write_text(json.dumps({"config": {}, "identity": old}))
    assert identity_of_folder(tmp_path) == identity
