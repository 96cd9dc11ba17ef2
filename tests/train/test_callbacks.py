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
from tuneforge.train.run import train

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
