"""What a run leaves for people: log.csv, TensorBoard events with the same numbers, the loss PNG
(at the end and through `tuneforge plot`), the resolved config with versions and seed, and a
summary JSON whose numbers agree with the log."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest
import torch
from tiny_chat_model import save_tiny_chat_model

from tuneforge.config import ConfigError, config_from_dict
from tuneforge.train.callbacks import read_log, resolve_report_to
from tuneforge.train.command import train

STEPS = 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only add OpenMP waits on a shared CPU
    folder = tmp_path_factory.mktemp("logging")
    config = config_from_dict({
        "model": {"name": str(save_tiny_chat_model(folder / "model")), "load_in_4bit": False,
                  "max_seq_length": 256, "use_kernels": False},
        "lora": {"r": 4, "alpha": 8, "gradient_checkpointing": False},
        "data": {"eval_fraction": 0.1},
        "training": {"output_dir": str(folder / "run"), "max_steps": STEPS, "eval_steps": 2, "seed": 11,
                     "per_device_train_batch_size": 2, "optim": "adamw_torch", "report_to": "auto"},
    })
    try:
        summary = train(config)
    finally:
        torch.set_num_threads(threads)
    return folder / "run", config, summary


def _tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of every event file in `folder` (TFRecord framing: length, crc, record, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    for file in sorted(folder.glob("events.out.tfevents.*")):
        data, offset = file.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = Event.FromString(data[offset + 12: offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_events_hold_the_logged_losses(run):
    pytest.importorskip("tensorboardX")
    output, _, _ = run
    scalars = _tensorboard_scalars(output / "tensorboard")
    rows = read_log(output)
    train = [(int(r["step"]), r["loss"]) for r in rows if "loss" in r]
    evals = [(int(r["step"]), r["eval_loss"]) for r in rows if "eval_loss" in r]
    assert len(train) == STEPS and [s for s, _ in evals] == [2, 4]
    assert [s for s, _ in scalars["train/loss"]] == [s for s, _ in train]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([v for _, v in train], rel=1e-6)  # float32 in events
    assert [v for _, v in scalars["eval/loss"]] == pytest.approx([v for _, v in evals], rel=1e-6)


def test_summary_and_resolved_config_describe_the_run(run):
    output, config, summary = run
    on_disk = json.loads((output / "summary.json").read_text())
    assert on_disk == summary
    losses = [r["loss"] for r in read_log(output) if "loss" in r]
    assert summary["steps"] == STEPS and summary["resumed_at_step"] is None
    assert summary["first_loss"] == losses[0] and summary["final_loss"] == losses[-1]
    assert summary["trained_tokens"] == int([r for r in read_log(output) if "loss" in r][-1]["num_tokens"]) > 0
    # "seconds" is rounded to 1 ms and the rate computed from the unrounded time: bound it by both roundings.
    tokens, seconds = summary["trained_tokens"], summary["seconds"]
    assert tokens / (seconds + 0.0005) - 0.05 <= summary["tokens_per_second"] <= tokens / (seconds - 0.0005) + 0.05
    assert 0.05 < summary["peak_memory_gib"] < 64
    assert summary["final_eval_loss"] == [r["eval_loss"] for r in read_log(output) if "eval_loss" in r][-1]
    assert summary["adapter"] == str(output / "adapter")

    resolved = json.loads((output / "config.resolved.json").read_text())
    assert resolved["config"] == config.to_dict() and resolved["seed"] == 11
    import transformers

    assert resolved["versions"]["transformers"] == transformers.__version__
    assert {"python", "torch", "peft", "trl", "bitsandbytes"} <= set(resolved["versions"])


def test_loss_plot_at_the_end_and_on_demand(run, tmp_path, capsys):
    import matplotlib.image

    from tuneforge.cli import main

    output, _, _ = run
    assert matplotlib.image.imread(output / "loss.png").ndim == 3
    out = tmp_path / "again.png"
    assert main(["plot", str(output), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 200 and image.shape[1] > 400
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "no training log at" in capsys.readouterr().err


@pytest.fixture
def nothing_installed(monkeypatch, tmp_path):
    import importlib.util

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "tensorboardX", "wandb") else found(name, *a))
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with W&B credentials


def test_report_to_auto_uses_only_what_is_installed(nothing_installed, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        assert resolve_report_to("auto", tmp_path) == []
    assert "TensorBoard logging off: neither tensorboard nor tensorboardX is installed" in caplog.text
    assert "Weights & Biases logging off: wandb is not installed" in caplog.text
    with pytest.raises(ConfigError, match="lists tensorboard, which is not installed: pip install tensorboard"):
        resolve_report_to(["tensorboard"], tmp_path)
    assert resolve_report_to("none", tmp_path) == []


def test_report_to_auto_skips_wandb_without_credentials(nothing_installed, monkeypatch, tmp_path, caplog):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "wandb" else None)
    with caplog.at_level(logging.INFO):
        assert resolve_report_to("auto", tmp_path) == []
    assert "wandb is installed but not logged in" in caplog.text


def test_log_has_speed_and_memory_and_the_plot_two_panels(run):
    import matplotlib.image

    output, _, _ = run
    rows = [r for r in read_log(output) if "loss" in r]
    assert all(r["tokens_per_second"] > 0 and r["memory_gib"] > 0 for r in rows)
    assert all("tokens_per_second" not in r for r in read_log(output) if "eval_loss" in r)
    image = matplotlib.image.imread(output / "loss.png")
    assert image.shape[0] > 700  # loss / lr on top, tokens/s and memory below


def test_data_report_and_plan_are_in_the_run_folder(run):
    output, _, _ = run
    report = json.loads((output / "data_report.json").read_text())
    assert report["rows_read"] == 160 and report["errors"] == [] and report["trained_tokens"] > 0
    assert (output / "data_lengths.png").stat().st_size > 1000
    plan = json.loads((output / "plan.json").read_text())
    assert plan["setup"]["batch"] == 2 and plan["estimate"]["peak"] > 0


def test_moving_average():
    from tuneforge.train.callbacks import moving_average

    assert moving_average([4.0, 2.0, 6.0, 0.0], 2) == [4.0, 3.0, 4.0, 3.0]


class _State:
    def __init__(self, step, max_steps=100):
        self.global_step, self.max_steps, self.is_world_process_zero = step, max_steps, True


def test_console_progress_smooths_and_prints_compact_lines(capsys):
    from tuneforge.train.callbacks import ConsoleProgress

    progress = ConsoleProgress()
    progress.on_train_begin(None, _State(0), None)
    assert progress.every == 10
    for step, loss in enumerate([4.0, 2.0, 4.0, 2.0, 4.0, 2.0, 4.0, 2.0, 4.0, 2.0], start=1):
        progress.on_log(None, _State(step), None, logs={"loss": loss, "learning_rate": 2e-4, "grad_norm": 1.5,
                                                        "tokens_per_second": 1234.5, "memory_gib": 1.25})
    progress.on_log(None, _State(10), None, logs={"eval_loss": 2.5})
    progress.on_log(None, _State(10), None, logs={"train_runtime": 1.0, "train_loss": 3.0})
    postfix = progress.bar.postfix
    progress.on_train_end(None, _State(10), None)
    out = capsys.readouterr()
    text = out.out + out.err
    assert 3.0 < progress.smoothed < 4.0 and "lr 2.0e-04" in postfix and "1,234 tok/s" in postfix
    assert "step    10/100 | loss 2.0000 (smoothed" in text and "| grad norm 1.5 | lr 2.0e-04" in text
    assert "step    10/100 | eval loss 2.5000" in text
    assert "{" not in text and "train_runtime" not in text  # no raw dicts


def test_use_console_progress_replaces_transformers_bar():
    from transformers.trainer_callback import CallbackHandler, ProgressCallback

    from tuneforge.train.callbacks import ConsoleProgress, CsvLogCallback, SummaryCallback, use_console_progress

    class Trainer:
        callback_handler = CallbackHandler([CsvLogCallback("x"), SummaryCallback("x"), ProgressCallback()],
                                           None, None, None, None)

        def remove_callback(self, kind):
            self.callback_handler.remove_callback(kind)

    trainer = Trainer()
    use_console_progress(trainer)
    kinds = [type(c) for c in trainer.callback_handler.callbacks]
    assert kinds == [CsvLogCallback, ConsoleProgress, SummaryCallback]


def test_summary_table_shows_the_estimate_beside_the_measurement():
    from tuneforge.planning.estimate import Estimate
    from tuneforge.train.callbacks import SummaryCallback

    callback = SummaryCallback("out")
    callback.summary = {"steps": 10, "resumed_at_step": None, "trained_tokens": 1000, "tokens_per_second": 50.0,
                        "first_loss": 3.0, "final_loss": 1.0, "final_eval_loss": None, "best_eval_loss": None,
                        "peak_memory_gib": 1.5}
    callback.estimate = Estimate("H100", 80 * 2**30, 2, 512, 512.0, parts={"weights": 2**30}, overhead=2**29,
                                 seconds_per_step=0.5)
    table = "\n".join(callback.table([3.0, 2.0, 1.0], 20.0))
    assert "2.00 s/step" in table and "estimated 1.00 GiB of tensors" in table and "1.50 GiB" in table
    assert "time estimate   0.50 s/step" in table


def test_banner_names_model_device_and_estimate(tmp_path):
    from tuneforge.config import config_from_dict
    from tuneforge.fast_language_model import FastLanguageModel
    from tuneforge.planning import plan_config
    from tuneforge.testing import tiny_model
    from tuneforge.train.callbacks import banner_lines

    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    config = config_from_dict({"model": {"name": str(tmp_path / "tiny"), "use_kernels": False}, "lora": {"r": 4}})
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "tiny"), load_in_4bit=True, use_kernels=False)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False, use_kernels=False)
    plan = plan_config(config, with_data=False)
    text = "\n".join(banner_lines(model, config, plan))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert "family llama | 4-bit NF4 | LoRA r=4 on 7 projections" in text
    assert f"trainable {trainable:,} of {plan.estimate.total_params:,}" in text and "device CPU" in text
    assert "estimate: peak" in text and "s/step" in text
    assert plan.estimate.trainable_params == trainable
