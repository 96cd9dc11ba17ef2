"""The dataset report before training: what the model will actually see, and the mistakes that
waste a run, caught before its first step.

    stats = PrepareStats()
    dataset = prepare_dataset(..., stats=stats)
    report = build_report(stats, tokenizer)
    print("\\n".join(report.lines()))
    report.write(run_folder)          # data_report.json + data_lengths.png
    report.raise_errors()             # DataError for the three hard errors below

Counted: rows read / kept / dropped / truncated (each with its reason), token length
percentiles, the fraction of tokens that carry loss, how many rows (and assistant turns) end their
trained span with the EOS / end-of-turn token, the template used, and the first example rendered
with its trained span marked.

Hard errors (a run that cannot learn what it should):
  * every label masked: nothing to train on (usually a template whose assistant turns were not found);
  * chat data whose labels never contain EOS / end-of-turn: the model never learns to stop;
  * pad token == EOS: collators that mask padding by id mask every EOS too.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.data.errors import DataError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
REPORT_NAME = "data_report.json"
HISTOGRAM_NAME = "data_lengths.png"
TRAINED_OPEN, TRAINED_CLOSE = "\u27e6", "\u27e7"  # ⟦ trained text ⟧ where colour is not available


@dataclass
class PrepareStats:
    """Filled in by `prepare_dataset(..., stats=)`: what happened to the rows on their way in.

    rows: the tokenized rows (input_ids, labels) after the overlong policy and before packing.
    """

    rows_read: int = 0
    format: str = ""
    template: str | None = None
    max_seq_length: int = 0
    overflow: str = ""
    truncated: dict[str, int] = field(default_factory=dict)  # reason -> rows
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows
    rows: object = None  # datasets.Dataset


@dataclass
class DataReport:
    rows_read: int
    rows_kept: int
    dropped: dict[str, int]
    truncated: dict[str, int]
    format: str
    template: str | None
    max_seq_length: int
    length_percentiles: dict[str, float]
    tokens: int
    trained_tokens: int
    rows_ending_with_eos: int
    turns: int
    turns_ending_with_eos: int
    eos_token: str | None
    eos_token_id: int | None
    stop_ids: list[int]  # EOS and any other token generation stops at (the model's generation_config)
    pad_token: str | None
    pad_token_id: int | None
    first_example: list[dict]  # [{"text": ..., "trained": bool}] in order
    lengths: list[int] = field(repr=False, default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def trained_fraction(self) -> float:
        return self.trained_tokens / self.tokens if self.tokens else 0.0

    def marked_example(self, colour: bool = False) -> str:
        """The first example's text with its trained spans marked: ANSI green, or ⟦ ⟧."""
        out = []
        for piece in self.first_example:
            if not piece["trained"]:
                out.append(piece["text"])
            elif colour:
                out.append(f"\x1b[1;32m{piece['text']}\x1b[0m")
            else:
                out.append(f"{TRAINED_OPEN}{piece['text']}{TRAINED_CLOSE}")
        return "".join(out)

    def lines(self, colour: bool | None = None) -> list[str]:
        colour = sys.stdout.isatty() if colour is None else colour
        pct = self.length_percentiles
        dropped = ", ".join(f"{n} {why}" for why, n in self.dropped.items()) or "none"
        truncated = ", ".join(f"{n} {why}" for why, n in self.truncated.items()) or "none"
        rows = [
            f"data: {self.rows_read} rows read, {self.rows_kept} kept; dropped: {dropped}; truncated: {truncated}",
            f"  format {self.format}, template {self.template or '-'}, max_seq_length {self.max_seq_length}",
            f"  tokens per row: p50 {pct['p50']:.0f}, p90 {pct['p90']:.0f}, p99 {pct['p99']:.0f}, "
            f"max {pct['max']:.0f}, mean {pct['mean']:.1f}",
            f"  {self.tokens:,} tokens, {self.trained_tokens:,} carry loss ({100 * self.trained_fraction:.1f}%)",
        ]
        if self.format != "text":
            also = [i for i in self.stop_ids if i != self.eos_token_id]
            rows.append(f"  EOS {self.eos_token!r} (id {self.eos_token_id}"
                        + (f"; also stopping at {also}" if also else "") + ") ends the trained span of "
                        f"{self.rows_ending_with_eos}/{self.rows_kept} rows, {self.turns_ending_with_eos}/{self.turns} "
                        f"assistant turns; pad {self.pad_token!r} (id {self.pad_token_id})")
        marker = "green" if colour else f"{TRAINED_OPEN} {TRAINED_CLOSE}"
        rows.append(f"  first example (trained tokens in {marker}):")
        rows += ["    " + line for line in self.marked_example(colour).splitlines()]
        rows += [f"  warning: {text}" for text in self.warnings]
        rows += [f"  ERROR: {text}" for text in self.errors]
        return rows

    def to_dict(self) -> dict:
        return {
            "rows_read": self.rows_read, "rows_kept": self.rows_kept, "dropped": self.dropped,
            "truncated": self.truncated, "format": self.format, "template": self.template,
            "max_seq_length": self.max_seq_length, "length_percentiles": self.length_percentiles,
            "tokens": self.tokens, "trained_tokens": self.trained_tokens,
            "trained_fraction": round(self.trained_fraction, 6),
            "rows_ending_with_eos": self.rows_ending_with_eos, "turns": self.turns,
            "turns_ending_with_eos": self.turns_ending_with_eos, "eos_token": self.eos_token,
            "eos_token_id": self.eos_token_id, "stop_ids": self.stop_ids, "pad_token": self.pad_token, "pad_token_id": self.pad_token_id,
            "first_example": self.first_example, "first_example_marked": self.marked_example(False),
            "errors": self.errors, "warnings": self.warnings,
        }

    def write(self, folder: str | Path) -> tuple[Path, Path | None]:
        """data_report.json and the length histogram (None where matplotlib is missing)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / REPORT_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False))
        return path, self.plot(folder / HISTOGRAM_NAME)

    def plot(self, path: Path) -> Path | None:
        try:
            import matplotlib
        except ImportError:
            logger.info("no length histogram: matplotlib is not installed")
            return None
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(7, 3.6), dpi=110)
        axis.hist(self.lengths, bins=min(50, max(5, len(set(self.lengths)))), color="tab:blue", alpha=0.8)
        axis.axvline(self.max_seq_length, color="tab:red", linestyle="--", label=f"max_seq_length {self.max_seq_length}")
        for name, style in (("p50", ":"), ("p99", "-.")):
            axis.axvline(self.length_percentiles[name], color="black", linestyle=style,
                         label=f"{name} {self.length_percentiles[name]:.0f}")
        axis.set_xlabel("tokens per row")
        axis.set_ylabel("rows")
        axis.set_title(f"{self.rows_kept} rows, {100 * self.trained_fraction:.1f}% of tokens trained")
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(path)
        plt.close(figure)
        return path

    def raise_errors(self) -> None:
        if self.errors:
            raise DataError("the data cannot train this model: " + "; ".join(self.errors))


def _percentiles(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0, "mean": 0.0}
    ordered = sorted(lengths)

    def at(p: float) -> int:
        return ordered[min(len(ordered) - 1, max(0, -(-len(ordered) * p // 100) - 1))]

    return {"p50": at(50), "p90": at(90), "p99": at(99), "max": ordered[-1], "mean": sum(ordered) / len(ordered)}


def _spans(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) runs of trained positions."""
    spans, start = [], None
    for i, label in enumerate(labels):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    if start is not None:
        spans.append((start, len(labels)))
    return spans


def _pieces(tokenizer, ids: list[int], labels: list[int]) -> list[dict]:
    pieces, cursor = [], 0
    for start, end in _spans(labels):
        if start > cursor:
            pieces.append({"text": tokenizer.decode(ids[cursor:start]), "trained": False})
        pieces.append({"text": tokenizer.decode(ids[start:end]), "trained": True})
        cursor = end
    if cursor < len(ids):
        pieces.append({"text": tokenizer.decode(ids[cursor:]), "trained": False})
    return pieces


def template_name(tokenizer, requested: str | None) -> str:
    """The chat template by table name where it is one, else where it came from."""
    from tuneforge.data.templates import template_for_tokenizer

    found = template_for_tokenizer(tokenizer)
    if found is not None:
        return found.name
    if requested not in (None, "auto"):
        return str(requested)
    return "the tokenizer's own" if getattr(tokenizer, "chat_template", None) else "none"


def build_report(stats: PrepareStats, tokenizer, stop_ids=()) -> DataReport:
    """The report of rows prepared with `stats` (see the module docstring for what is checked).

    stop_ids: token ids generation stops at besides the tokenizer's EOS (a model's own template may
    end turns with another token, e.g. Gemma's <end_of_turn>, listed in its generation_config)."""
    rows = stats.rows
    all_ids = rows["input_ids"] if rows is not None else []
    all_labels = rows["labels"] if rows is not None else []
    lengths = [len(ids) for ids in all_ids]
    eos_id = getattr(tokenizer, "eos_token_id", None)
    stops = sorted({eos_id, *stop_ids} - {None})
    pad_id = getattr(tokenizer, "pad_token_id", None)
    trained = rows_eos = turns = turns_eos = 0
    for labels in all_labels:
        spans = _spans(labels)
        trained += sum(end - start for start, end in spans)
        turns += len(spans)
        ends = [labels[end - 1] in stops for _, end in spans]
        turns_eos += sum(ends)
        rows_eos += bool(ends and ends[-1])
    report = DataReport(
        rows_read=stats.rows_read, rows_kept=len(lengths), dropped=dict(stats.dropped),
        truncated=dict(stats.truncated), format=stats.format, template=stats.template,
        max_seq_length=stats.max_seq_length, length_percentiles=_percentiles(lengths), tokens=sum(lengths),
        trained_tokens=trained, rows_ending_with_eos=rows_eos, turns=turns, turns_ending_with_eos=turns_eos,
        eos_token=getattr(tokenizer, "eos_token", None), eos_token_id=eos_id, stop_ids=stops,
        pad_token=getattr(tokenizer, "pad_token", None), pad_token_id=pad_id,
        first_example=_pieces(tokenizer, all_ids[0], all_labels[0]) if lengths else [], lengths=lengths,
    )
    _check(report)
    return report


def _check(report: DataReport) -> None:
    if report.rows_kept and report.trained_tokens == 0:
        report.errors.append(
            "every label is masked (-100): no token carries loss. The assistant turns were not found: check "
            "data.chat_template (a named template, e.g. 'chatml') or set data.train_on_responses_only: false")
    chat = report.format != "text"
    if chat and report.trained_tokens and report.eos_token_id is not None and report.turns_ending_with_eos == 0:
        report.errors.append(
            f"no trained span ends with EOS / end-of-turn {report.eos_token!r} (id {report.eos_token_id}): the "
            "model would never learn to stop generating. Use a chat template that closes assistant turns with "
            "the tokenizer's EOS (data.chat_template), or raise max_seq_length if truncation cut the ends off")
    elif chat and report.rows_ending_with_eos < report.rows_kept:
        missing = report.rows_kept - report.rows_ending_with_eos
        report.warnings.append(f"{missing} of {report.rows_kept} rows end their trained span without EOS "
                               "(truncated, or a reply left open on purpose)")
    if report.pad_token_id is not None and report.pad_token_id == report.eos_token_id:
        report.errors.append(
            f"the pad token is the EOS token {report.eos_token!r} (id {report.eos_token_id}): collators that mask "
            "padding by id mask every EOS too, and the model never learns to stop. Set a distinct pad token "
            "(FastLanguageModel.from_pretrained does: fix_tokenizer=True)")
    cut = sum(report.truncated.values())
    if report.rows_kept and cut > 0.1 * report.rows_kept:
        report.warnings.append(f"{cut} of {report.rows_kept} rows were truncated to {report.max_seq_length} tokens")


def report_before_training(stats: PrepareStats, tokenizer, folder: str | Path | None, stop_ids=(),
                           show: bool = True) -> DataReport:
    """Build, print (when `show`), write (when `folder`) and check the report: raises DataError on a
    hard error (in every process of a distributed run, so that all stop)."""
    report = build_report(stats, tokenizer, stop_ids)
    if show:
        print("\n".join(report.lines()), flush=True)
    if folder is not None:
        path, plot = report.write(folder)
        logger.info("data report written to %s%s", path, f" and {plot}" if plot else "")
    report.raise_errors()
    return report
