"""From a user's dataset to token ids with labels, in one call (what the trainer and the CLI use).

    dataset = prepare_dataset("train.jsonl", tokenizer, chat_template="llama-3.1", max_seq_length=2048)
    dataset.column_names   # ["input_ids", "labels"]  (+ "position_ids", "seq_lengths" with packing=True)

Steps: load (`loading.load_records`) -> one shape (`formats.to_conversations`, auto-detected or
`format=`) -> tokens and labels (`masking.tokenize_conversation` with the chat template, or
`raw_text` windows for format "text") -> the overlong policy -> optional packing (`packing`).

Overlong conversations (more than max_seq_length tokens) follow `overflow`, and are always counted
in the log:
    "error"     stop with the rows named (default: nothing is cut without the user saying so)
    "truncate"  keep the first max_seq_length tokens; rows left without any trained token are dropped
    "drop"      leave those rows out
Raw text is cut into windows and never overflows.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from tuneforge.data.errors import DataError
from tuneforge.data.masking import IGNORE_INDEX

logger = logging.getLogger(__name__)

OVERFLOW_POLICIES = ("error", "truncate", "drop")


def _check_args(max_seq_length, overflow, text_stride):
    if not isinstance(max_seq_length, int) or max_seq_length < 2:
        raise DataError(f"max_seq_length must be an integer >= 2, got {max_seq_length!r}")
    if overflow not in OVERFLOW_POLICIES:
        raise DataError(f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}, got {overflow!r}")
    if not 0 <= text_stride < max_seq_length:
        raise DataError(f"text_stride must be in [0, max_seq_length), got {text_stride}")


def apply_overflow(dataset, max_seq_length: int, overflow: str, *, locate=None, stats=None):
    """Apply the overlong policy to a tokenized dataset (input_ids, labels); logs what it did
    (and counts it in `stats`, a data.report.PrepareStats, when given)."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    long_rows = [i for i, n in enumerate(lengths) if n > max_seq_length]
    if stats is not None:
        stats.max_seq_length, stats.overflow = max_seq_length, overflow
    if not long_rows:
        return dataset
    if overflow == "error":
        shown = []
        for i in long_rows[:5]:
            where = f"{locate(i)[0]} row {locate(i)[1]}" if locate else f"row {i}"
            shown.append(f"{where} ({lengths[i]} tokens)")
        more = f" and {len(long_rows) - 5} more" if len(long_rows) > 5 else ""
        raise DataError(
            f"{len(long_rows)} of {len(lengths)} rows are longer than max_seq_length={max_seq_length}: "
            f"{', '.join(shown)}{more}. Raise max_seq_length, or set overflow='truncate' or 'drop'"
        )
    if overflow == "drop":
        drop = set(long_rows)
        kept = dataset.select([i for i in range(len(lengths)) if i not in drop])
        logger.warning("overflow=drop: dropped %d of %d rows longer than %d tokens", len(drop), len(lengths), max_seq_length)
        if stats is not None:
            stats.dropped[f"longer than max_seq_length={max_seq_length} (overflow=drop)"] = len(drop)
        if len(kept) == 0:
            raise DataError(f"overflow=drop left no rows: every row is longer than max_seq_length={max_seq_length}")
        return kept

    def cut(row):
        return {"input_ids": row["input_ids"][:max_seq_length], "labels": row["labels"][:max_seq_length]}

    truncated = dataset.map(cut, desc="truncating")
    empty = [i for i in long_rows if all(label == IGNORE_INDEX for label in truncated[i]["labels"])]
    logger.warning("overflow=truncate: cut %d of %d rows to %d tokens", len(long_rows), len(lengths), max_seq_length)
    if stats is not None:
        stats.truncated[f"longer than max_seq_length={max_seq_length} (overflow=truncate)"] = len(long_rows) - len(empty)
    if empty:
        drop = set(empty)
        truncated = truncated.select([i for i in range(len(lengths)) if i not in drop])
        logger.warning("overflow=truncate: dropped %d rows whose assistant turns all lay beyond %d tokens",
                       len(empty), max_seq_length)
        if stats is not None:
            stats.dropped[f"no assistant token within max_seq_length={max_seq_length}"] = len(empty)
        if len(truncated) == 0:
            raise _nothing_left_to_train(dataset, empty, max_seq_length, locate)
    return truncated


def _nothing_left_to_train(dataset, rows: list[int], max_seq_length: int, locate) -> DataError:
    """Every row lost all its trained tokens to truncation: name rows and the length that keeps them."""
    starts = {i: next((k for k, label in enumerate(dataset[i]["labels"]) if label != IGNORE_INDEX),
                      len(dataset[i]["labels"])) for i in rows}
    shown = []
    for i in rows[:3]:
        where = f"{locate(i)[0]}, row {locate(i)[1]}" if locate else f"row {i}"
        shown.append(f"{where}: the reply starts at token {starts[i]} of {len(dataset[i]['input_ids'])}")
    return DataError(
        f"overflow=truncate left no rows to train on: in all {len(rows)} rows the assistant's reply starts after "
        f"max_seq_length={max_seq_length} tokens ({'; '.join(shown)}{' ...' if len(rows) > 3 else ''}). "
        f"Raise model.max_seq_length (>= {min(starts.values()) + 1} keeps at least one row), or shorten the prompts"
    )


def prepare_dataset(
    source,
    tokenizer,
    *,
    split: str = "train",
    format: str = "auto",
    field_map: Mapping[str, str] | None = None,
    chat_template=None,
    max_seq_length: int = 2048,
    overflow: str = "error",
    train_on_responses_only: bool = True,
    packing: bool = False,
    text_stride: int = 0,
    num_proc: int | None = None,
    stats=None,
):
    """Load, format, template, tokenize, label, check lengths and optionally pack a dataset.

    source: a path (file or folder of .json/.jsonl/.csv/.parquet), a Hub name, a datasets.Dataset /
        DatasetDict, or a list of dicts (see `loading`).
    format: "auto" or one of formats.FORMATS; field_map: {canonical field: your column}.
    chat_template: a template name (set on the tokenizer with get_chat_template, so inference uses
        the same one), or None/"auto" for the tokenizer's own template.
    train_on_responses_only: labels only on assistant tokens (else on every token).
    packing: group samples into rows of max_seq_length with restarting position_ids.
    text_stride: overlap between windows of raw text.
    stats: a data.report.PrepareStats to fill with what happened to the rows (read, dropped,
        truncated, the rows before packing) for the dataset report.
    Returns a datasets.Dataset with input_ids, labels (and position_ids, seq_lengths when packing).
    """
    from tuneforge.data.formats import to_conversations
    from tuneforge.data.loading import load_records
    from tuneforge.data.masking import tokenize_conversation
    from tuneforge.data.raw_text import RawTextDataLoader
    from tuneforge.data.templates import get_chat_template

    _check_args(max_seq_length, overflow, text_stride)
    records, locate = load_records(source, split=split)
    if stats is not None:
        stats.rows_read, stats.max_seq_length = len(records), max_seq_length
    standard, detected = to_conversations(
        records, format, field_map, locate=locate, require_assistant=train_on_responses_only
    )
    if detected == "text":
        dataset = RawTextDataLoader(tokenizer, max_seq_length, text_stride).from_texts(standard["text"])
    else:
        if chat_template is not None and chat_template != "auto":
            get_chat_template(tokenizer, chat_template)
        elif not getattr(tokenizer, "chat_template", None):
            raise DataError("the tokenizer has no chat template; pass chat_template=<name> "
                            "(see tuneforge.data.templates.list_chat_templates())")

        def tokenize(row, index):
            try:
                result = tokenize_conversation(row["messages"], tokenizer, train_on_responses_only=train_on_responses_only)
            except DataError as error:
                file, position = locate(index)
                raise error.located(source=file, row=position) from None
            return {"input_ids": result.input_ids, "labels": result.labels,
                    "differs": result.differs_from_one_shot}

        dataset = standard.map(tokenize, with_indices=True, remove_columns=standard.column_names,
                               num_proc=num_proc, desc="tokenizing")
        differing = sum(dataset["differs"])
        dataset = dataset.remove_columns("differs")
        if differing:
            logger.info("tokenizing: %d of %d rows tokenize differently at a prompt/reply boundary than in one "
                        "piece; kept the piecewise ids (tuneforge.data.masking explains why)", differing, len(dataset))
        dataset = apply_overflow(dataset, max_seq_length, overflow, locate=locate, stats=stats)
    tokens = sum(len(ids) for ids in dataset["input_ids"])
    trained = sum(sum(label != IGNORE_INDEX for label in labels) for labels in dataset["labels"])
    logger.info("data ready: %d rows, %d tokens, %d trained (%.1f%%), format %s",
                len(dataset), tokens, trained, 100 * trained / max(tokens, 1), detected)
    if stats is not None:
        from tuneforge.data.report import template_name

        stats.format, stats.rows = detected, dataset
        stats.template = None if detected == "text" else template_name(tokenizer, chat_template)
    if packing:
        from tuneforge.data.packing import pack_dataset

        dataset = pack_dataset(dataset, max_seq_length)
    return dataset
