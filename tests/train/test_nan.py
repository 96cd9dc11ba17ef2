"""A NaN/inf loss or gradient stops training at that step with a message naming it; the update
is not applied and the last checkpoint saved before it is kept, complete and finite."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_chat_model import save_tiny_chat_model
from transformers import TrainerCallback

from tuneforge.config import config_from_dict
from tuneforge.train.guards import NonFiniteError
from tuneforge.train.resume import checkpoint_problem, list_checkpoints
from tuneforge.train.command import train

BAD_STEP = 7
SAVE_STEPS = 3  # checkpoints at 3 and 6: step 6 is the last good one


class InjectFault(TrainerCallback):
    """Breaks optimiser step `step`. "loss": a LoRA weight becomes NaN, so the loss is NaN.
    "gradient": the loss stays finite, one LoRA weight's gradient is multiplied by inf."""

    def __init__(self, step: int, kind: str):
        self.step, self.kind = step, kind

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 != self.step:
            return
        name, weight = next((n, p) for n, p in model.named_parameters() if "lora_B" in n)
        if self.kind == "loss":
            with torch.no_grad():
                weight.fill_(float("nan"))
        else:
            weight.register_hook(lambda grad: grad * float("inf"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("nan") / "model")


def _config(model_dir, output_dir, **training):
    return config_from_dict({
        "model": {"name": str(model_dir), "load_in_4bit": False, "max_seq_length": 256, "use_kernels": False},
        "lora": {"r": 4, "alpha": 8, "gradient_checkpointing": False},
        "training": {"output_dir": str(output_dir), "max_steps": 12, "save_steps": SAVE_STEPS,
                     "per_device_train_batch_size": 2, "optim": "adamw_torch", "report_to": "none",
                     "max_grad_norm": 1.0, **training},
    })


@pytest.mark.parametrize("kind, what", [
    ("loss", "the training loss is nan"),
    ("gradient", "the gradients hold"),
])
def test_non_finite_step_stops_the_run_and_keeps_the_last_good_checkpoint(model_dir, tmp_path, one_thread, kind, what):
    output = tmp_path / "run"
    with pytest.raises(NonFiniteError) as raised:
        train(_config(model_dir, output), extra_callbacks=[InjectFault(BAD_STEP, kind)])
    error = raised.value
    message = str(error)
    assert f"training stopped at step {BAD_STEP}: {what}" in message
    assert f"the last good checkpoint is {output / 'checkpoint-6'}" in message
    assert error.step == BAD_STEP and error.checkpoint == output / "checkpoint-6"
    if kind == "gradient":  # names the tensor and tells the loss was fine
        assert "lora_B" in message and "loss " in message

    # Nothing after the last good checkpoint was saved; it is whole and finite.
    assert [p.name for p in list_checkpoints(output)] == ["checkpoint-3", "checkpoint-6"]
    assert checkpoint_problem(output / "checkpoint-6") is None
    weights = load_file(output / "checkpoint-6" / "adapter_model.safetensors")
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    assert not (output / "adapter").exists()
    # The log ends at the last applied step and holds no NaN; the summary says why the run stopped.
    steps = [line.split(",")[0] for line in (output / "log.csv").read_text().splitlines()[1:]]
    assert steps == [str(s) for s in range(1, BAD_STEP)]
    assert "nan" not in (output / "log.csv").read_text()
    summary = json.loads((output / "summary.json").read_text())
    assert summary["step"] == BAD_STEP and summary["last_good_checkpoint"] == str(output / "checkpoint-6")


def test_stop_before_any_checkpoint_says_there_is_none(model_dir, tmp_path, one_thread):
    with pytest.raises(NonFiniteError, match=r"at step 2: .*no checkpoint was saved before it \(set training.save_steps"):
        train(_config(model_dir, tmp_path / "run", save_steps=0, max_steps=3), extra_callbacks=[InjectFault(2, "loss")])


def test_the_cli_reports_the_stop_without_a_traceback(model_dir, tmp_path, monkeypatch, capsys):
    """`tuneforge train` turns the error into one line and exit code 2."""
    from tuneforge import cli
    from tuneforge.train import command as run

    def stopped(config, **options):
        raise NonFiniteError("training stopped at step 5: the training loss is nan", 5, None)

    monkeypatch.setattr(run, "train", stopped)
    assert cli.main(["train", "--output", str(tmp_path)]) == 2
    assert "tuneforge: error: training stopped at step 5" in capsys.readouterr().err
