"""`tuneforge train` under a careless or hostile user: a used output folder, changed configs on
--resume, damaged checkpoints, a full disk, Ctrl-C. In every case the earlier work is still there,
byte for byte (`_files`), and a resumed run ends with the adapter of an uninterrupted one."""

from __future__ import annotations

import errno
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
from safetensors.torch import load_file
from tiny_chat_model import save_tiny_chat_model

from tuneforge.config import config_from_dict
from tuneforge.train.resume import ResumeError, checkpoint_problem, list_checkpoints
from tuneforge.data.sources import default_rows
from tuneforge.train.command import train

# Only names that existed before issue 15 are imported at the top, so that this file also runs
# against the code before it (to show each test failed there); run_folder's ResumeError is a
# ResumeError.
STEPS = 4
ADAPTER = "adapter_model.safetensors"
LOCK_NAME = ".tuneforge.lock"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run-faults")
    model = save_tiny_chat_model(folder / "model")
    rows = default_rows("train")
    data_a, data_b = folder / "a.jsonl", folder / "b.jsonl"
    data_a.write_text("".join(json.dumps(row) + "\n" for row in rows[:12]))
    data_b.write_text("".join(json.dumps(row) + "\n" for row in rows[12:24]))
    return {"folder": folder, "model": model, "data_a": data_a, "data_b": data_b}


def _config(inputs, output: Path, data: str = "data_a", learning_rate: float = 1e-3, **training):
    values = {"output_dir": str(output), "max_steps": STEPS, "save_steps": 1, "per_device_train_batch_size": 2,
              "learning_rate": learning_rate, "warmup_steps": 0, "optim": "adamw_torch", "report_to": "none"}
    values.update(training)
    return config_from_dict({
        "model": {"name": str(inputs["model"]), "load_in_4bit": False, "max_seq_length": 256, "use_kernels": False},
        "lora": {"r": 4, "alpha": 8, "gradient_checkpointing": False},
        "data": {"path": str(inputs[data])},
        "training": values,
    })


@pytest.fixture(scope="module")
def run_a(inputs):
    """Run A: 4 steps, a checkpoint each step. Tests copy it before touching it."""
    output = inputs["folder"] / "run_a"
    torch.set_num_threads(1)
    train(_config(inputs, output))
    return output


def _copy(run_a: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run_a, target)
    config = json.loads((target / "config.resolved.json").read_text())
    config["config"]["training"]["output_dir"] = str(target)  # what a run in this folder would have written
    (target / "config.resolved.json").write_text(json.dumps(config))
    return target


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` and its bytes (the lock file aside: it holds a process id)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_NAME}


def _no_model_load(monkeypatch):
    """Refusals must come before the model loads (seconds to minutes on a real model)."""
    from tuneforge.fast_language_model import FastLanguageModel

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(FastLanguageModel, "from_pretrained", refuse)


def _same_adapter(a: Path, b: Path) -> None:
    expected, got = load_file(a / "adapter" / ADAPTER), load_file(b / "adapter" / ADAPTER)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


# --- one run, one folder ------------------------------------------------------------------------


def test_a_second_run_into_a_used_folder_is_refused_and_the_first_kept(inputs, run_a, tmp_path, monkeypatch):
    """Before: run B replaced A's adapter, log and checkpoints 1-2 and kept A's 3-4, without a word."""
    folder = _copy(run_a, tmp_path)
    before = _files(folder)
    _no_model_load(monkeypatch)
    with pytest.raises(ResumeError, match=r"already holds a run: 4 checkpoints \(checkpoint-1 \.\.\. checkpoint-4\)"
                       r".*adapter/.*\(4 steps done\)\. Pass --resume to continue it, --overwrite to replace it"):
        train(_config(inputs, folder, data="data_b", learning_rate=5e-3, max_steps=2))
    assert _files(folder) == before


def test_resume_refuses_a_run_with_other_data_or_learning_rate(inputs, run_a, tmp_path, monkeypatch):
    """Before: `B --resume` continued from A's checkpoint-4 and exited 0 with A's adapter."""
    folder = _copy(run_a, tmp_path)
    before = _files(folder)
    _no_model_load(monkeypatch)
    with pytest.raises(ResumeError) as raised:
        train(_config(inputs, folder, data="data_b", learning_rate=5e-3, max_steps=8), resume=True)
    message = str(raised.value)
    assert f"{folder / 'checkpoint-4'} was written by a run with another config, data or model" in message
    assert "training.learning_rate: 0.001 -> 0.005" in message and "data.path" in message
    assert "--allow-changes" in message
    assert _files(folder) == before


def test_resume_refuses_a_changed_model_and_changed_data_content(inputs, run_a, tmp_path, monkeypatch):
    folder = _copy(run_a, tmp_path)
    model = tmp_path / "model"
    shutil.copytree(inputs["model"], model)
    config = json.loads((model / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (model / "config.json").write_text(json.dumps(config))
    resolved = json.loads((folder / "config.resolved.json").read_text())
    _no_model_load(monkeypatch)
    changed = _config(inputs, folder, max_steps=8)
    changed.model.name = str(model)
    with pytest.raises(ResumeError, match="(?s)model.name: .*model: model files changed since the run started"):
        train(changed, resume=True)
    # The same path with other content: the data file edited in place between the runs.
    data = tmp_path / "a.jsonl"
    data.write_text(inputs["data_a"].read_text())
    resolved["identity"]["config"]["data.path"] = str(data)
    (folder / "config.resolved.json").write_text(json.dumps(resolved))
    for checkpoint in list_checkpoints(folder):  # as if the run had been made with this data path
        manifest = json.loads((checkpoint / "tuneforge_checkpoint.json").read_text())
        manifest["identity"]["config"]["data.path"] = str(data)
        (checkpoint / "tuneforge_checkpoint.json").write_text(json.dumps(manifest))
    data.write_text(data.read_text().replace("a", "e", 5))
    edited = _config(inputs, folder, max_steps=8)
    edited.data.path = str(data)
    with pytest.raises(ResumeError, match=r"data: data files changed since the run started \(a.jsonl\)"):
        train(edited, resume=True)


def test_resume_with_allow_changes_continues_and_records_the_changes(inputs, run_a, tmp_path, caplog):
    folder = _copy(run_a, tmp_path)
    with caplog.at_level(logging.WARNING):
        train(_config(inputs, folder, learning_rate=2e-3, max_steps=6), resume=True, allow_changes=True)
    assert "training.learning_rate: 0.001 -> 0.002" in caplog.text
    resolved = json.loads((folder / "config.resolved.json").read_text())
    assert resolved["resumes"] == [{"from": "checkpoint-4", "changes": ["training.learning_rate: 0.001 -> 0.002"]}]
    assert [p.name for p in list_checkpoints(folder)][-1] == "checkpoint-6"


def test_overwrite_replaces_the_earlier_run_whole(inputs, run_a, tmp_path):
    folder = _copy(run_a, tmp_path)
    train(_config(inputs, folder, data="data_b", max_steps=2), overwrite=True)
    assert [p.name for p in list_checkpoints(folder)] == ["checkpoint-1", "checkpoint-2"]  # none of A's 3-4
    assert len((folder / "log.csv").read_text().splitlines()) == 1 + 2
    assert json.loads((folder / "summary.json").read_text())["steps"] == 2


def test_files_no_run_wrote_are_never_removed(inputs, tmp_path, monkeypatch):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    (folder / "train.jsonl").write_text("{}\n")
    _no_model_load(monkeypatch)
    for options in ({}, {"overwrite": True}):
        with pytest.raises(ResumeError, match=r"holds files that no tuneforge run wrote \(notes.txt, train.jsonl\)"):
            train(_config(inputs, folder), **options)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "train.jsonl"]


def test_the_output_folder_may_not_be_the_data_or_model_folder(inputs, tmp_path, monkeypatch):
    data_folder = tmp_path / "data"
    data_folder.mkdir()
    shutil.copy(inputs["data_a"], data_folder / "a.jsonl")
    _no_model_load(monkeypatch)
    config = _config(inputs, data_folder / "run")
    config.data.path = str(data_folder)
    with pytest.raises(ResumeError, match="is inside the data folder .* would read this run's log.csv"):
        train(config)
    assert not (data_folder / "run").exists()
    with pytest.raises(ResumeError, match="is the model folder"):
        train(_config(inputs, inputs["model"]), overwrite=True)
    assert sorted(p.name for p in inputs["model"].iterdir()) == sorted(
        p.name for p in inputs["model"].iterdir() if not p.name.startswith("."))


def test_two_processes_cannot_write_into_one_folder(inputs, tmp_path):
    from tuneforge.train.run_folder import claim_output_dir

    config = _config(inputs, tmp_path / "run")
    held = claim_output_dir(config)
    try:
        with pytest.raises(ResumeError, match=f"is in use by another tuneforge run \\(process {os.getpid()}\\)"):
            claim_output_dir(config, resume=True)
    finally:
        held.release()
    claim_output_dir(config).release()  # free again once released


def test_a_run_stopped_before_its_first_step_leaves_a_reusable_folder(inputs, tmp_path, monkeypatch):
    folder = tmp_path / "run"
    from tuneforge.fast_language_model import FastLanguageModel

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(FastLanguageModel, "from_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(_config(inputs, folder))
    monkeypatch.undo()
    assert {p.name for p in folder.iterdir()} <= {"config.resolved.json", LOCK_NAME}
    train(_config(inputs, folder, max_steps=1))  # nothing of value was there: taken without --overwrite


# --- checkpoints: verified on resume, written whole -----------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = [
    ("adapter weights truncated", ADAPTER, _truncate, "adapter_model.safetensors is truncated"),
    ("optimizer truncated", "optimizer.pt", _truncate, "optimizer.pt is truncated"),
    ("optimizer byte flipped", "optimizer.pt", _flip_a_byte, "optimizer.pt changed since it was written"),
    ("rng state emptied", "rng_state.pth", lambda p: p.write_bytes(b""), "rng_state.pth is truncated"),
    ("scheduler removed", "scheduler.pt", Path.unlink, "missing scheduler.pt"),
]


@pytest.mark.parametrize("what, name, damage, reason", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_resume_falls_back_from_a_damaged_checkpoint(inputs, run_a, tmp_path, caplog, what, name, damage, reason):
    """Before: a truncated weights or optimizer file in the newest checkpoint crashed --resume."""
    folder = _copy(run_a, tmp_path)
    shutil.rmtree(folder / "adapter")
    damage(folder / "checkpoint-4" / name)
    assert checkpoint_problem(folder / "checkpoint-4").startswith(reason)
    with caplog.at_level(logging.WARNING):
        train(_config(inputs, folder), resume=True)
    assert f"checkpoint-4 is damaged ({reason}" in caplog.text and "falling back to checkpoint-3" in caplog.text
    _same_adapter(run_a, folder)  # step 4 redone from checkpoint-3: the uninterrupted run's adapter
    assert checkpoint_problem(folder / "checkpoint-4") is None


def test_resume_past_max_steps_is_refused(inputs, run_a, tmp_path, monkeypatch):
    folder = _copy(run_a, tmp_path)
    before = _files(folder)
    _no_model_load(monkeypatch)
    with pytest.raises(ResumeError, match="checkpoint-4 is past training.max_steps=2"):
        train(_config(inputs, folder, max_steps=2), resume=True)
    assert _files(folder) == before


def _disk_full_at(monkeypatch, owner, method: str, step: int, partial: bool = True):
    """From `step` on, `owner.method` writes half a file and fails as a full disk does."""
    original = getattr(owner, method)

    def full(self, output_dir, *args, **kwargs):
        if self.state.global_step >= step:
            if partial:
                (Path(output_dir) / "optimizer.pt").write_bytes(b"PK\x03\x04half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir, *args, **kwargs)

    monkeypatch.setattr(owner, method, full)


def test_a_full_disk_during_a_checkpoint_keeps_the_last_whole_one(inputs, run_a, tmp_path, monkeypatch):
    """Before: the checkpoint was written in place; a full disk left half of it and a traceback."""
    from transformers import Trainer

    folder = tmp_path / "run"
    _disk_full_at(monkeypatch, Trainer, "_save_optimizer_and_scheduler", step=3)
    with pytest.raises(ResumeError, match=r"no space left on the device while saving a checkpoint; nothing "
                       rf"half-written was kept: the last complete checkpoint is {folder / 'checkpoint-2'}"):
        train(_config(inputs, folder))
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir() if "checkpoint" in p.name) == ["checkpoint-1", "checkpoint-2"]
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name]
    train(_config(inputs, folder), resume=True)
    _same_adapter(run_a, folder)


def test_a_full_disk_while_saving_the_adapter_leaves_no_half_adapter(inputs, run_a, tmp_path, monkeypatch):
    from peft import PeftModel

    folder = _copy(run_a, tmp_path)
    previous = _files(folder / "adapter")
    original = PeftModel.save_pretrained

    def full(self, directory, *args, **kwargs):
        if not Path(directory).name.startswith(".adapter.tmp-"):  # checkpoints save fine
            return original(self, directory, *args, **kwargs)
        (Path(directory) / ADAPTER).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PeftModel, "save_pretrained", full)
    with pytest.raises(ResumeError, match=f"while saving the adapter to {folder / 'adapter'}; nothing half-written "
                       f"was kept: the last complete checkpoint is {folder / 'checkpoint-6'}"):
        train(_config(inputs, folder, max_steps=6), resume=True)
    monkeypatch.setattr(PeftModel, "save_pretrained", original)
    assert _files(folder / "adapter") == previous  # the earlier adapter, whole
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name]


def test_rotation_keeps_the_newest_checkpoints_whole(inputs, tmp_path):
    """save_total_limit rotates in the real folder after each staged checkpoint is renamed in."""
    folder = tmp_path / "run"
    train(_config(inputs, folder, save_total_limit=2))
    assert [p.name for p in list_checkpoints(folder)] == ["checkpoint-3", "checkpoint-4"]
    assert all(checkpoint_problem(p) is None for p in list_checkpoints(folder))
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name]


def test_a_full_disk_anywhere_else_is_one_line(tmp_path, monkeypatch, capsys):
    """A full disk outside the guarded writes (the datasets cache, the log) is still no traceback."""
    from tuneforge import cli
    from tuneforge.train import command as run

    def full(config, **options):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run, "train", full)
    assert cli.main(["train", "--output", str(tmp_path / "x")]) == 2
    assert "no space left on the device" in capsys.readouterr().err


# --- Ctrl-C ---------------------------------------------------------------------------------------


def _cli(config_path: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tuneforge.cli", "train", str(config_path), "--output", str(output), *extra]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1", HF_HUB_OFFLINE="1")


def test_ctrl_c_with_save_steps_0_saves_a_resumable_checkpoint_and_the_adapter(inputs, tmp_path):
    """Before: Ctrl-C with the default save_steps: 0 printed a traceback and lost every finished step."""
    import yaml

    steps = 30
    config = _config(inputs, tmp_path / "unused", max_steps=steps, save_steps=0).to_dict()
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(config))
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    reference = subprocess.Popen(_cli(config_path, straight), env=_env(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    victim = subprocess.Popen(_cli(config_path, stopped), env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    log = stopped / "log.csv"
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3):  # two steps logged
        assert victim.poll() is None, victim.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the run never logged two steps"
        time.sleep(0.01)
    victim.send_signal(signal.SIGINT)
    _, err = victim.communicate(timeout=240)
    assert victim.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    step = json.loads((stopped / "summary.json").read_text())["interrupted_at_step"]
    assert 2 <= step < steps, "the run ended before the signal: nothing was tested"
    assert f"SIGINT at step {step}: saved {stopped / f'checkpoint-{step}'} and the adapter" in err
    assert checkpoint_problem(stopped / f"checkpoint-{step}") is None
    at_stop = load_file(stopped / "adapter" / ADAPTER)
    assert all(torch.equal(at_stop[k], v) for k, v in load_file(stopped / f"checkpoint-{step}" / ADAPTER).items())

    resumed = subprocess.run(_cli(config_path, stopped, "--resume"), env=_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert reference.wait(timeout=300) == 0
    _same_adapter(straight, stopped)  # nothing lost: the interrupted + resumed run is the uninterrupted one


def test_sigterm_asks_the_same_clean_stop():
    from transformers import TrainerControl, TrainerState

    from tuneforge.train.guards import InterruptGuard

    guard = InterruptGuard()
    with guard.installed():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert guard.requested and guard.signal_name == "SIGTERM"
        state, control = TrainerState(), TrainerControl()
        state.global_step = 7
        guard.on_step_end(None, state, control)
    assert control.should_save and control.should_training_stop and guard.step == 7
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
