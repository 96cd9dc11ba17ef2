"""Training callbacks for people: a CSV of every logged step, a loss/lr plot, one summary line."""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from pathlib import Path

from transformers import TrainerCallback

from tuneforge.config import ConfigError
from tuneforge.device import peak_memory_gib

logger = logging.getLogger(__name__)

CSV_NAME = "log.csv"
PLOT_NAME = "loss.png"
SUMMARY_NAME = "summary.json"
_CSV_FIELDS = ("step", "epoch", "loss", "learning_rate", "grad_norm", "num_tokens", "eval_loss")


class CsvLogCallback(TrainerCallback):
    """Appends each log event (train or eval) to <output_dir>/log.csv, flushed at once."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / CSV_NAME

    def on_train_begin(self, args, state, control, **kwargs):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists() or state.global_step == 0:
            with self.path.open("w", newline="") as handle:
                csv.writer(handle).writerow(_CSV_FIELDS)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
        if not any(key in row for key in ("loss", "eval_loss")):
            return
        with self.path.open("a", newline="") as handle:
            csv.writer(handle).writerow([row.get(field, "") for field in _CSV_FIELDS])


def read_log(path: str | Path) -> list[dict]:
    """Rows of a run's log.csv (a run folder or the file itself), numbers as floats."""
    path = Path(path)
    if path.is_dir():
        path = path / CSV_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no training log at {path}")
    rows = []
    with path.open() as handle:
        for row in csv.DictReader(handle):
            rows.append({key: float(value) for key, value in row.items() if value not in ("", None)})
    return rows


def plot_log(run: str | Path, out: str | Path | None = None) -> Path:
    """Render loss (train and eval) and learning rate against step into a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(run)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    rates = [(r["step"], r["learning_rate"]) for r in rows if "learning_rate" in r]
    if not train and not evals:
        raise ValueError(f"{run}: the log has no loss values to plot")
    figure, loss_axis = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        loss_axis.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        loss_axis.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss")
    if rates:
        rate_axis = loss_axis.twinx()
        rate_axis.plot(*zip(*rates), "--", color="tab:gray", label="learning rate")
        rate_axis.set_ylabel("learning rate")
    loss_axis.legend(loc="upper right")
    loss_axis.set_title("tuneforge training")
    figure.tight_layout()
    out = Path(out) if out else (Path(run) if Path(run).is_dir() else Path(run).parent) / PLOT_NAME
    figure.savefig(out)
    plt.close(figure)
    return out


class SummaryCallback(TrainerCallback):
    """At the end: plot, summary.json and one line (steps, tokens/s, peak memory, output folder)."""

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)
        self.start = None
        self.summary: dict = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
        self.start_step = state.global_step
        # A resumed run starts with the killed run's history: count only this session's tokens.
        self.start_tokens = _tokens_seen(state.log_history)

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        seconds = time.perf_counter() - (self.start or time.perf_counter())
        losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
        eval_losses = [entry["eval_loss"] for entry in state.log_history if "eval_loss" in entry]
        tokens = _tokens_seen(state.log_history) - getattr(self, "start_tokens", 0)
        self.summary = {
            "steps": state.global_step,
            "resumed_at_step": self.start_step or None,
            "seconds": round(seconds, 3),
            "trained_tokens": int(tokens),
            "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 and tokens else None,
            "peak_memory_gib": round(peak_memory_gib(), 3),
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "final_eval_loss": eval_losses[-1] if eval_losses else None,
            "best_eval_loss": state.best_metric if eval_losses else None,
            "best_checkpoint": state.best_model_checkpoint,
            "output_dir": str(self.output_dir),
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / SUMMARY_NAME).write_text(json.dumps(self.summary, indent=2))
        try:
            plot_log(self.output_dir)
        except (FileNotFoundError, ValueError) as error:
            logger.warning("no loss plot: %s", error)
        line = (
            f"done: {self.summary['steps']} steps in {seconds:.0f} s, "
            f"{self.summary['tokens_per_second'] or 0:,.0f} tokens/s, "
            f"loss {_fmt(self.summary['first_loss'])} -> {_fmt(self.summary['final_loss'])}, "
            f"peak memory {self.summary['peak_memory_gib']:.2f} GiB, output {self.output_dir}"
        )
        print(line, flush=True)


def _tokens_seen(log_history) -> int:
    return int(max((entry.get("num_tokens", 0) for entry in log_history), default=0))


def resolve_report_to(report_to, output_dir: str | Path) -> list:
    """`training.report_to` -> TensorBoard / W&B callbacks for what is installed and asked for.

    "auto": TensorBoard when tensorboard or tensorboardX is installed (events in
    <output_dir>/tensorboard), W&B when wandb is installed and has credentials or WANDB_MODE set
    (it would otherwise stop to ask for a login). A target named explicitly must be installed.
    Each choice is logged; the CSV log is always written.
    """
    import importlib.util

    def installed(*names):
        return any(importlib.util.find_spec(name) is not None for name in names)

    explicit = isinstance(report_to, list)
    wanted = report_to if explicit else ([] if report_to == "none" else ["tensorboard", "wandb"])
    callbacks = []
    if "tensorboard" in wanted:
        if installed("tensorboard", "tensorboardX"):
            from transformers.integrations import TensorBoardCallback

            callback = TensorBoardCallback()
            callback.logging_dir = str(Path(output_dir) / "tensorboard")
            callbacks.append(callback)
            logger.info("logging to TensorBoard: %s", callback.logging_dir)
        elif explicit:
            raise ConfigError("training.report_to lists tensorboard, which is not installed: pip install tensorboard")
        else:
            logger.info("TensorBoard logging off: neither tensorboard nor tensorboardX is installed")
    if "wandb" in wanted:
        if not installed("wandb"):
            if explicit:
                raise ConfigError("training.report_to lists wandb, which is not installed: pip install wandb")
            logger.info("Weights & Biases logging off: wandb is not installed")
        elif explicit or os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") or _wandb_logged_in():
            from transformers.integrations import WandbCallback

            callbacks.append(WandbCallback())
            logger.info("logging to Weights & Biases (project %s)", os.environ.get("WANDB_PROJECT", "huggingface"))
        else:
            logger.info("Weights & Biases logging off: wandb is installed but not logged in "
                        "(run `wandb login`, or set WANDB_MODE=offline)")
    return callbacks


def _wandb_logged_in() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"
