"""Training callbacks for people: a CSV of every logged step, the console while it runs, a
loss / speed plot and a summary at the end.

Console: a start banner (model, family, quantisation, trainable parameters, device, the plan's
estimate), one progress bar whose postfix carries the smoothed loss, learning rate, tokens/s and
memory, a compact line every ~10% of the run (never transformers' raw dicts), and a summary table.
log.csv gains tokens_per_second and memory_gib per logged step, which the plot's second panel shows.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

from transformers import TrainerCallback

from tuneforge import switches
from tuneforge.config import ConfigError
from tuneforge.device import peak_memory_gib

logger = logging.getLogger(__name__)

CSV_NAME = "log.csv"
PLOT_NAME = "loss.png"
SUMMARY_NAME = "summary.json"
_CSV_FIELDS = ("step", "epoch", "loss", "learning_rate", "grad_norm", "num_tokens", "eval_loss", "tokens_per_second",
               "memory_gib")
SMOOTHING = 0.9  # the progress bar's loss: an exponential moving average (a batch of 2 rows is noise)


def current_memory_gib() -> float:
    """What the run holds now: the CUDA caching allocator's reserved bytes, or the process's RSS."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.memory_reserved() / 2**30
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return peak_memory_gib()


class CsvLogCallback(TrainerCallback):
    """Appends each log event (train or eval) to <output_dir>/log.csv, flushed at once.

    Training events also get tokens_per_second (tokens since the previous event over the time
    since then) and memory_gib (current_memory_gib), added to the event's `logs` so that the
    console progress, which runs after this callback, shows the same numbers.
    """

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / CSV_NAME
        self.fields = _CSV_FIELDS
        self._last: tuple[float, float] | None = None  # (time, tokens) at the previous training event

    def on_train_begin(self, args, state, control, **kwargs):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists() or state.global_step == 0:
            with self.path.open("w", newline="") as handle:
                csv.writer(handle).writerow(_CSV_FIELDS)
        else:  # a resumed run appends in the columns the file already has
            with self.path.open(newline="") as handle:
                self.fields = tuple(next(csv.reader(handle), _CSV_FIELDS))
        self._last = (time.perf_counter(), _tokens_seen(state.log_history))

    def on_evaluate(self, args, state, control, **kwargs):
        if self._last is not None:  # evaluation time is not training speed
            self._last = (time.perf_counter(), self._last[1])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        if "loss" in logs and "num_tokens" in logs and self._last is not None:
            now, tokens = time.perf_counter(), float(logs["num_tokens"])
            seconds = now - self._last[0]
            if seconds > 0:
                logs["tokens_per_second"] = round((tokens - self._last[1]) / seconds, 2)
            logs["memory_gib"] = round(current_memory_gib(), 4)
            self._last = (now, tokens)
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
        if not any(key in row for key in ("loss", "eval_loss")):
            return
        with self.path.open("a", newline="") as handle:
            csv.writer(handle).writerow([row.get(field, "") for field in self.fields])


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


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (the first points average what there is)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_log(run: str | Path, out: str | Path | None = None) -> Path:
    """Render a run's log into a PNG; returns its path.

    Top: the raw per-step loss faint, its moving average bold, eval loss as points, the learning
    rate dashed on a second axis. Bottom (when the log has them): tokens/s and memory over steps.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(run)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    rates = [(r["step"], r["learning_rate"]) for r in rows if "learning_rate" in r]
    speed = [(r["step"], r["tokens_per_second"]) for r in rows if "tokens_per_second" in r]
    memory = [(r["step"], r["memory_gib"]) for r in rows if "memory_gib" in r]
    if not train and not evals:
        raise ValueError(f"{run}: the log has no loss values to plot")
    panels = 2 if (speed or memory) else 1
    figure, axes = plt.subplots(panels, 1, figsize=(8, 3.4 * panels + 0.4), dpi=110, sharex=True, squeeze=False)
    loss_axis = axes[0][0]
    handles = []
    if train:
        steps, losses = zip(*train)
        window = max(5, len(losses) // 20)
        handles += loss_axis.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=1, label="train loss")
        handles += loss_axis.plot(steps, moving_average(list(losses), window), color="tab:blue", linewidth=2.2,
                                  label=f"train loss, mean of {window}")
    if evals:
        handles += loss_axis.plot(*zip(*evals), "o-", color="tab:orange", linewidth=1.5, label="eval loss")
    loss_axis.set_ylabel("loss")
    loss_axis.grid(alpha=0.3)
    if rates:
        rate_axis = loss_axis.twinx()
        handles += rate_axis.plot(*zip(*rates), "--", color="tab:gray", linewidth=1, label="learning rate")
        rate_axis.set_ylabel("learning rate")
        rate_axis.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    loss_axis.legend(handles=handles, loc="upper right", fontsize=8)
    loss_axis.set_title("tuneforge training")
    if panels == 2:
        speed_axis = axes[1][0]
        lower = []
        if speed:
            lower += speed_axis.plot(*zip(*speed), color="tab:green", linewidth=1.5, label="tokens/s")
        speed_axis.set_ylabel("tokens / s")
        speed_axis.grid(alpha=0.3)
        if memory:
            memory_axis = speed_axis.twinx()
            lower += memory_axis.plot(*zip(*memory), color="tab:purple", linewidth=1.5, label="memory GiB")
            memory_axis.set_ylabel("memory GiB")
        speed_axis.legend(handles=lower, loc="lower right", fontsize=8)
    axes[-1][0].set_xlabel("step")
    figure.tight_layout()
    out = Path(out) if out else (Path(run) if Path(run).is_dir() else Path(run).parent) / PLOT_NAME
    figure.savefig(out)
    plt.close(figure)
    return out


class ConsoleProgress(TrainerCallback):
    """One progress bar (postfix: smoothed loss, lr, tokens/s, memory), a compact line every
    `every` steps (~10% of the run) and after each evaluation; transformers' raw dicts never print.

    Takes the place of transformers' ProgressCallback (`use_console_progress`); its evaluation bar
    is kept.
    """

    def __init__(self, every: int | None = None):
        from transformers.trainer_callback import ProgressCallback

        self._evaluation = ProgressCallback()  # the eval-loop bar, as transformers draws it
        self.every = every
        self.bar = None
        self.smoothed: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step",
                            dynamic_ncols=True)
        self._evaluation.training_bar = self.bar  # the eval bar then leaves no line behind
        self.every = self.every or max(1, state.max_steps // 10)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_prediction_step(self, args, state, control, **kwargs):
        self._evaluation.on_prediction_step(args, state, control, **kwargs)

    def on_evaluate(self, args, state, control, **kwargs):
        self._evaluation.on_evaluate(args, state, control, **kwargs)

    def on_predict(self, args, state, control, **kwargs):
        self._evaluation.on_predict(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        if "loss" in logs:
            loss = float(logs["loss"])
            self.smoothed = loss if self.smoothed is None else SMOOTHING * self.smoothed + (1 - SMOOTHING) * loss
            self.bar.set_postfix_str(self.postfix(logs), refresh=False)
            if state.global_step % self.every == 0 or state.global_step == state.max_steps:
                self.bar.write(self.line(state, logs))
        elif "eval_loss" in logs:
            self.bar.write(f"step {state.global_step:>5}/{state.max_steps} | eval loss {logs['eval_loss']:.4f}")

    def postfix(self, logs) -> str:
        parts = [f"loss {self.smoothed:.3f}"]
        if "learning_rate" in logs:
            parts.append(f"lr {float(logs['learning_rate']):.1e}")
        if "tokens_per_second" in logs:
            parts.append(f"{float(logs['tokens_per_second']):,.0f} tok/s")
        if "memory_gib" in logs:
            parts.append(f"{float(logs['memory_gib']):.2f} GiB")
        return ", ".join(parts)

    def line(self, state, logs) -> str:
        text = f"step {state.global_step:>5}/{state.max_steps} | loss {float(logs['loss']):.4f} (smoothed {self.smoothed:.4f})"
        if "grad_norm" in logs:
            text += f" | grad norm {float(logs['grad_norm']):.3g}"
        rest = self.postfix(logs).split(", ")[1:]
        return text + "".join(f" | {part}" for part in rest)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._evaluation.training_bar = None


def use_console_progress(trainer) -> ConsoleProgress:
    """Swap transformers' progress / printer callbacks (one raw dict per log) for ConsoleProgress."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    progress = ConsoleProgress()
    callbacks = trainer.callback_handler.callbacks
    # After CsvLogCallback (it adds tokens/s and memory to each event), before SummaryCallback (the
    # bar is closed when the summary prints).
    summary = next((i for i, c in enumerate(callbacks) if isinstance(c, SummaryCallback)), len(callbacks))
    callbacks.insert(summary, progress)
    return progress


def banner_lines(model, config, plan=None) -> list[str]:
    """The start banner: what trains, on what, and the plan's estimate."""
    from tuneforge.models.loader import family_of

    spec = family_of(model)
    m = config.model
    quant = "full fine-tune" if m.full_finetuning else "4-bit NF4" if m.load_in_4bit else \
        "8-bit" if m.load_in_8bit else "16-bit"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = plan.estimate.total_params if plan is not None else sum(p.numel() for p in model.parameters())
    device = plan.estimate.device if plan is not None else str(next(model.parameters()).device)
    t = config.training
    rows = [
        f"tuneforge: {m.name} | family {spec.name if spec else '-'} | {quant} | "
        f"LoRA r={config.lora.r} on {len(config.lora.target_modules) if isinstance(config.lora.target_modules, list) else config.lora.target_modules} projections"
        if not m.full_finetuning else f"tuneforge: {m.name} | family {spec.name if spec else '-'} | {quant}",
        f"  trainable {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%) | device {device}",
        f"  batch {t.per_device_train_batch_size} x accumulation {t.gradient_accumulation_steps}, "
        f"max_seq_length {m.max_seq_length}, lr {t.learning_rate:g}, {t.max_steps if t.max_steps > 0 else 'epochs'} steps, "
        f"output {t.output_dir}",
    ]
    if plan is not None:
        e = plan.estimate
        fits = {True: "fits", False: "DOES NOT FIT", None: ""}[e.fits]
        rows.append(f"  estimate: peak {_gib(e.peak)} of tensors ({_gib(e.device_total)} with "
                    f"{e.overhead_label.lstrip('+ ')}) {fits}, ~{e.seconds_per_step:.2f} s/step"
                    + (f", host {_gib(e.host_offloaded)} offloaded" if e.host_offloaded else ""))
    return rows


class SummaryCallback(TrainerCallback):
    """At the end: plot, summary.json and one line (steps, tokens/s, peak memory, output folder)."""

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)
        self.start = None
        self.summary: dict = {}
        self.estimate = None  # the plan's Estimate, when train() made one: shown beside the measured numbers

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
        print("\n".join([line, *self.table(losses, seconds)]), flush=True)

    def table(self, losses: list[float], seconds: float) -> list[str]:
        """The summary as a two-column table (with the plan's estimate beside what happened)."""
        s = self.summary
        steps = max(s["steps"] - (s["resumed_at_step"] or 0), 1)
        rows = [("steps", f"{s['steps']}" + (f" (resumed at {s['resumed_at_step']})" if s["resumed_at_step"] else "")),
                ("time", f"{seconds:.1f} s ({seconds / steps:.2f} s/step)"),
                ("trained tokens", f"{s['trained_tokens']:,} ({s['tokens_per_second'] or 0:,.1f} tokens/s)")]
        if losses:
            tail = losses[-max(1, len(losses) // 10):]
            rows.append(("loss", f"{_fmt(s['first_loss'])} -> {_fmt(s['final_loss'])} "
                                 f"(mean of the last {len(tail)}: {sum(tail) / len(tail):.4f})"))
        if s["final_eval_loss"] is not None:
            rows.append(("eval loss", f"{_fmt(s['final_eval_loss'])} (best {_fmt(s['best_eval_loss'])})"))
        memory = f"{s['peak_memory_gib']:.2f} GiB"
        if self.estimate is not None:
            memory += f" (estimated {_gib(self.estimate.peak)} of tensors" + (
                f" + {_gib(self.estimate.overhead)} process)" if self.estimate.overhead_label.startswith(
                    "+ process") else ")")
            rows.append(("time estimate", f"{self.estimate.seconds_per_step:.2f} s/step"))
        rows.append(("peak memory", memory))
        rows.append(("output", f"{self.output_dir} (adapter, log.csv, loss.png, summary.json)"))
        width = max(len(name) for name, _ in rows)
        rule = "-" * (width + 2 + max(len(value) for _, value in rows))
        return [rule, *[f"{name:<{width}}  {value}" for name, value in rows], rule]


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
        elif explicit or switches.wandb_configured() or _wandb_logged_in():
            from transformers.integrations import WandbCallback

            callbacks.append(WandbCallback())
            logger.info("logging to Weights & Biases (project %s)", switches.wandb_project())
        else:
            logger.info("Weights & Biases logging off: wandb is installed but not logged in "
                        "(run `wandb login`, or set WANDB_MODE=offline)")
    return callbacks


def _wandb_logged_in() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB" if value >= 0.1 * 2**30 else f"{value / 2**20:.1f} MiB"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"
