"""Where a run's data comes from: the shipped instruction set (split once into train and held-out
rows) or the user's path, and the tokenized train / eval datasets of a TrainConfig."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from tuneforge.config import DEFAULT_DATASET, DEFAULT_HELDOUT, TrainConfig

HELDOUT_ROWS = 40  # the shipped set's last rows: never trained on by default, scored by `tuneforge eval`


def default_dataset_path() -> Path:
    """The instruction set the package ships (200 Alpaca-style rows, see scripts/make_default_data.py)."""
    return Path(str(resources.files("tuneforge") / "resources" / "default_instructions.jsonl"))


def default_rows(part: str) -> list[dict]:
    """The shipped set split once for train and eval: "train" (all but the last HELDOUT_ROWS rows)
    or "heldout" (those last rows). The rows are shuffled when the file is made, so the tail holds
    every kind of task."""
    with default_dataset_path().open() as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return rows[:-HELDOUT_ROWS] if part == "train" else rows[-HELDOUT_ROWS:]


def dataset_source(path: str):
    """data.path -> what prepare_dataset reads: the shipped names become their rows."""
    if path == DEFAULT_DATASET:
        return default_rows("train")
    if path == DEFAULT_HELDOUT:
        return default_rows("heldout")
    return path


def build_datasets(config: TrainConfig, tokenizer, chat_template: str | None, stats=None):
    """Tokenized train (and optional eval) datasets with input_ids / labels; `stats` (a
    data.report.PrepareStats) is filled for the dataset report."""
    from tuneforge.data import prepare_dataset

    data = config.data
    dataset = prepare_dataset(
        dataset_source(data.path),
        tokenizer,
        split=data.split,
        format=data.format,
        chat_template=chat_template,
        field_map=data.field_map,
        max_seq_length=config.model.max_seq_length,
        overflow=data.overflow,
        train_on_responses_only=data.train_on_responses_only,
        packing=data.packing,
        stats=stats,
    )
    if data.eval_fraction <= 0:
        return dataset, None
    split = dataset.train_test_split(test_size=data.eval_fraction, seed=config.training.seed, shuffle=True)
    return split["train"], split["test"]
