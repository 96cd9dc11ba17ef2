"""Load training data from wherever it is into a datasets.Dataset, remembering where each row came from.

    dataset, locate = load_records("data/train.jsonl")
    dataset, locate = load_records("data/")                   # every .json/.jsonl/.csv/.parquet inside
    dataset, locate = load_records("yahma/alpaca-cleaned")    # the Hub, when it is reachable
    dataset, locate = load_records(my_dataset_dict, split="train")

`locate(i)` -> (source name, row within that source) turns an index of the concatenated dataset
back into "train-2.jsonl, row 17" for error messages. Rows are numbered from 0.

A string that is not an existing path is taken as a Hub dataset name only when it looks like one
("owner/name") and the Hub is not switched off (`switches.offline()`); otherwise
the error says the file is missing.
"""

from __future__ import annotations

import bisect
import csv
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from tuneforge import switches
from tuneforge.data.errors import DataError

logger = logging.getLogger(__name__)

SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

Locator = Callable[[int], tuple[str, int]]


class _Locator:
    """Maps an index of concatenated parts back to (part name, row in the part)."""

    def __init__(self, names: Sequence[str], lengths: Sequence[int]):
        self.names = list(names)
        self.starts = []
        total = 0
        for length in lengths:
            self.starts.append(total)
            total += length

    def __call__(self, index: int) -> tuple[str, int]:
        part = bisect.bisect_right(self.starts, index) - 1
        return self.names[part], index - self.starts[part]


class _Duplicated(dict):
    """A JSON object in which a key was written twice (json keeps the last value silently)."""

    key: str = ""


def _object(pairs):
    record = dict(pairs)
    if len(record) != len(pairs):
        seen, duplicated = set(), _Duplicated(record)
        for key, _ in pairs:
            if key in seen:
                duplicated.key = key
                break
            seen.add(key)
        return duplicated
    return record


def _duplicated_key(value, where: str = "") -> tuple[str, str] | None:
    """(key, field path) of the first object in `value` that wrote a key twice."""
    if isinstance(value, _Duplicated):
        return value.key, f"{where}.{value.key}" if where else value.key
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((f"[{k}]", v) for k, v in enumerate(value))
    else:
        return None
    for key, item in items:
        path = f"{where}{key}" if str(key).startswith("[") else (f"{where}.{key}" if where else str(key))
        found = _duplicated_key(item, path)
        if found:
            return found
    return None


def _utf8_lines(path: Path):
    """(line number, text) of a file, every byte checked as UTF-8 (a BOM allowed): pyarrow keeps
    invalid bytes in a string column and fails only when the row is read, far from here."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"line {number}, byte {error.start + 1} of the line: not UTF-8 text "
                                f"({raw[error.start:error.start + 4]!r}); re-save the file as UTF-8",
                                source=str(path)) from None


def _check_json(path: Path) -> None:
    """Check a JSON / JSON Lines file as datasets will read it, naming the line, row and field of
    the first problem: bytes that are not UTF-8, invalid JSON, a row that is not an object, a key
    written twice in one object."""
    lines = _utf8_lines(path)
    first = next((text for _, text in _utf8_lines(path) if text.strip()), "")
    if path.suffix.lower() == ".jsonl" or not first.lstrip().startswith("["):
        row = 0
        try:
            for line_number, line in lines:
                if not line.strip():
                    continue
                _check_json_line(path, line, line_number, row)
                row += 1
        except DataError as error:
            raise error.located(row=row) from None
        return
    text = "".join(line for _, line in lines)
    try:
        records = json.loads(text, object_pairs_hook=_object)
    except json.JSONDecodeError as error:
        raise DataError(f"invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}",
                        source=str(path)) from None
    if not isinstance(records, list):
        raise DataError("expected a JSON list of objects (or JSON Lines)", source=str(path))
    for row, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"is a {type(record).__name__}, expected a JSON object", source=str(path), row=row)
        duplicated = _duplicated_key(record)
        if duplicated:
            raise DataError(f"key {duplicated[0]!r} is written twice in one object (JSON keeps the last value "
                            "silently); keep one", source=str(path), row=row, field=duplicated[1])


def _check_json_line(path: Path, line: str, line_number: int, row: int) -> None:
    try:
        record = json.loads(line, object_pairs_hook=_object)
    except json.JSONDecodeError as error:
        raise DataError(f"invalid JSON on line {line_number}: {error.msg}", source=str(path), row=row) from None
    if not isinstance(record, dict):
        raise DataError(f"line {line_number} is a {type(record).__name__}, expected a JSON object",
                        source=str(path), row=row)
    duplicated = _duplicated_key(record)
    if duplicated:
        raise DataError(f"line {line_number}: key {duplicated[0]!r} is written twice in one object "
                        "(JSON keeps the last value silently); keep one", source=str(path), row=row,
                        field=duplicated[1])


def _check_csv(path: Path, strict: bool = False) -> None:
    """Check a CSV file: UTF-8 throughout, no column name twice (pandas would rename the second
    'output.1' silently); with `strict`, also every row's field count and quoting, naming the line."""
    lines = (text for _, text in _utf8_lines(path))
    reader = csv.reader(lines, strict=strict)
    header, row = None, -1
    try:
        header = next(reader, None)
        if header is None:
            raise DataError("has no header row", source=str(path))
        twice = sorted({name for name in header if header.count(name) > 1})
        if twice:
            raise DataError(f"the header names column(s) {twice} twice; rename one", source=str(path),
                            field=twice[0])
        if not strict:
            for row, _ in enumerate(reader):  # the UTF-8 check of every line
                pass
            return
        for row, fields in enumerate(reader):
            if fields and len(fields) != len(header):
                raise DataError(f"line {reader.line_num}: {len(fields)} fields, the header has {len(header)}",
                                source=str(path), row=row)
    except csv.Error as error:
        raise DataError(f"line {reader.line_num}: broken CSV ({error})", source=str(path), row=row + 1) from None
    except DataError as error:  # a line that is not UTF-8: name its row
        raise (error.located(row=row + 1) if header is not None and error.field is None else error) from None


def _load_file(path: Path):
    from datasets import load_dataset

    builder = SUFFIXES.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"unsupported file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}", source=str(path))
    if path.stat().st_size == 0:
        raise DataError("the file is empty", source=str(path))
    if builder == "json":
        _check_json(path)
    elif builder == "csv":
        _check_csv(path)
    try:
        dataset = load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:  # datasets wraps parser errors in several types; we re-locate them
        if builder == "csv":
            _check_csv(path, strict=True)
        cause = error.__cause__ or error.__context__ or error
        raise DataError(f"cannot be read as {builder}: {type(cause).__name__}: {str(cause)[:300]}",
                        source=str(path)) from error
    return dataset


def _files_in(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES and not p.name.startswith("."))
    if not files:
        raise DataError(f"no {'/'.join(SUFFIXES)} files in this folder", source=str(folder))
    return files


def _concatenate(parts, names):
    from datasets import concatenate_datasets

    columns = [sorted(part.column_names) for part in parts]
    for name, cols in zip(names[1:], columns[1:]):
        if cols != columns[0]:
            raise DataError(f"has columns {cols} but {names[0]} has {columns[0]}; files of one dataset must agree",
                            source=name)
    try:
        return concatenate_datasets(parts)
    except Exception as error:
        raise DataError(f"the files cannot be joined into one dataset: {error}", source=", ".join(names)) from error


def _looks_like_hub_name(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not Path(text).suffix.lower() in SUFFIXES and not text.startswith((".", "/", "~"))


def load_records(source, *, split: str = "train", name: str | None = None):
    """`source` -> (datasets.Dataset, locate). See the module docstring for what `source` may be.

    split: the split of a DatasetDict or a Hub dataset ("train", "train[:1000]" for the Hub).
    name: a label for error messages when `source` is an in-memory object.
    Raises DataError for a missing path, an unsupported or unreadable file, files that disagree on
    columns, an unknown split, an unreachable Hub, and an empty result.
    """
    from datasets import Dataset, DatasetDict

    if isinstance(source, DatasetDict):
        if split not in source:
            raise DataError(f"no split {split!r}; the dataset has {sorted(source)}", source=name or "DatasetDict")
        source = source[split]
    if isinstance(source, Dataset):
        label = name or getattr(source.info, "dataset_name", None) or "dataset"
        return source, _Locator([label], [len(source)])
    if isinstance(source, (list, tuple)):
        if not all(isinstance(row, Mapping) for row in source):
            raise DataError("a list source must hold one mapping (dict) per row", source=name or "list")
        if not source:
            raise DataError("the dataset is empty (0 rows)", source=name or "list")
        return Dataset.from_list([dict(row) for row in source]), _Locator([name or "list"], [len(source)])
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(f"cannot load data from a {type(source).__name__}; pass a path, a Hub name, a "
                        "datasets.Dataset/DatasetDict or a list of dicts")
    path = Path(source).expanduser()
    if path.is_file():
        dataset = _load_file(path)
        logger.info("data: %d rows from %s", len(dataset), path)
        return dataset, _Locator([str(path)], [len(dataset)])
    if path.is_dir():
        files = _files_in(path)
        parts = [_load_file(file) for file in files]
        names = [str(file) for file in files]
        dataset = _concatenate(parts, names) if len(parts) > 1 else parts[0]
        logger.info("data: %d rows from %d files in %s", len(dataset), len(files), path)
        return dataset, _Locator(names, [len(part) for part in parts])
    text = str(source)
    if not _looks_like_hub_name(text):
        raise DataError("no such file or folder", source=text)
    if switches.offline():
        raise DataError("is not a local file or folder, and the Hugging Face Hub is switched off "
                        "(HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE/HF_DATASETS_OFFLINE); download it first or pass a local path", source=text)
    from datasets import load_dataset

    try:
        dataset = load_dataset(text, split=split)
    except Exception as error:
        raise DataError(f"cannot load from the Hub (split {split!r}): {error}", source=text) from error
    logger.info("data: %d rows from the Hub dataset %s (%s)", len(dataset), text, split)
    return dataset, _Locator([text], [len(dataset)])
