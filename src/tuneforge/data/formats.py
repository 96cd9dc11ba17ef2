"""Dataset formats -> one shape: a conversation (a list of {"role", "content"}) or raw text.

Formats, detected from the column names (or forced with `format=`):

    alpaca              instruction, output, optional input and system      -> system? + user + assistant
    prompt_completion   prompt, completion (strings, TRL's format)          -> user + assistant
    sharegpt            conversations: [{"from": "human", "value": ...}]    -> the turns, roles mapped
    messages            messages: [{"role": "user", "content": ...}]        -> the turns (OpenAI style)
    text                text                                                -> raw text, no template

`field_map` renames the user's columns to these canonical names, e.g.
`{"instruction": "question", "output": "answer"}` reads an Alpaca dataset whose columns are called
question/answer. Alpaca's user turn is the instruction, then a blank line and the input when the
input is present and non-empty.

Role names are mapped through one table (`ROLE_ALIASES`): human/user/input/prompter -> user,
gpt/assistant/bot/chatgpt/model/output/ai -> assistant, system -> system. Anything else is an error
that names the row and the message, never a silent skip.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from tuneforge.data.errors import DataError

logger = logging.getLogger(__name__)

FORMATS = ("alpaca", "prompt_completion", "sharegpt", "messages", "text")

# Canonical column names of each format; field_map maps these to the user's own column names.
FORMAT_FIELDS = {
    "alpaca": ("instruction", "input", "output", "system"),
    "prompt_completion": ("prompt", "completion"),
    "sharegpt": ("conversations",),
    "messages": ("messages",),
    "text": ("text",),
}
_REQUIRED = {
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "sharegpt": ("conversations",),
    "messages": ("messages",),
    "text": ("text",),
}
# Column names that hold a list of turns, in the order we look for them.
_CONVERSATION_COLUMNS = ("messages", "conversations", "conversation")

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "input": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "output": "assistant",
    "ai": "assistant",
}


def _role_table(system: Iterable[str], user: Iterable[str], assistant: Iterable[str]) -> dict[str, str]:
    table = {}
    for role, names in (("system", system), ("user", user), ("assistant", assistant)):
        for name in names:
            table[str(name).lower()] = role
    return table


def _text_of(content: Any, *, field: str) -> str:
    """Message content as a string: a string, or OpenAI-style parts [{"type": "text", "text": ...}]."""
    if isinstance(content, str):
        return content
    if content is None:
        raise DataError("is null; every message needs text content", field=field)
    if isinstance(content, (list, tuple)):
        pieces = []
        for k, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
                raise DataError(
                    f"part {k} is not a text part ({part!r}); only text content can be trained on", field=field
                )
            pieces.append(part["text"])
        return "".join(pieces)
    raise DataError(f"must be a string, got {type(content).__name__} ({content!r})", field=field)


def normalize_conversation(
    turns: Any,
    *,
    field: str = "messages",
    role_key: str = "role",
    content_key: str = "content",
    roles: Mapping[str, str] = ROLE_ALIASES,
    require_assistant: bool = True,
) -> list[dict[str, str]]:
    """Validate one conversation and return it as [{"role": system|user|assistant, "content": str}].

    `role_key`/`content_key` are the keys inside each turn ("from"/"value" for ShareGPT). Raises
    DataError (with `field` such as "messages[2].role") for: not a list, an empty list, a turn that is
    not a mapping, a missing or null role or content, an unknown role, a system turn after the first
    position, and (with `require_assistant`) a conversation without an assistant turn.
    """
    if turns is None:
        raise DataError("is null; expected a list of turns", field=field)
    if isinstance(turns, (str, bytes)) or not isinstance(turns, Sequence):
        raise DataError(f"must be a list of turns, got {type(turns).__name__}", field=field)
    if len(turns) == 0:
        raise DataError("is an empty conversation", field=field)
    out = []
    for k, turn in enumerate(turns):
        where = f"{field}[{k}]"
        if not isinstance(turn, Mapping):
            raise DataError(f"must be a mapping with {role_key!r} and {content_key!r}, got {turn!r}", field=where)
        if role_key not in turn:
            raise DataError(f"missing (keys present: {sorted(turn)})", field=f"{where}.{role_key}")
        if turn[role_key] is None:
            raise DataError("is null; every turn needs a role", field=f"{where}.{role_key}")
        name = str(turn[role_key])
        role = roles.get(name.lower())
        if role is None:
            known = ", ".join(sorted(roles))
            raise DataError(f"unknown role {name!r}; known roles: {known}", field=f"{where}.{role_key}")
        if content_key not in turn:
            raise DataError(f"missing (keys present: {sorted(turn)})", field=f"{where}.{content_key}")
        content = _text_of(turn[content_key], field=f"{where}.{content_key}")
        if role == "system" and k != 0:
            raise DataError("a system turn is only allowed first in a conversation", field=f"{where}.{role_key}")
        out.append({"role": role, "content": content})
    if require_assistant and not any(turn["role"] == "assistant" for turn in out):
        raise DataError("has no assistant turn, so there is nothing to train on", field=field)
    return out


def _required_string(record: Mapping[str, Any], key: str, column: str) -> str:
    if column not in record:
        raise DataError("is missing", field=column)
    value = record[column]
    if value is None:
        # A table (Arrow) cannot tell a key missing from one row from a null: both read as None.
        raise DataError("is missing or null", field=column)
    if not isinstance(value, str):
        raise DataError(f"must be a string, got {type(value).__name__} ({value!r})", field=column)
    return value


def _optional_string(record: Mapping[str, Any], column: str) -> str:
    value = record.get(column)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"must be a string, got {type(value).__name__} ({value!r})", field=column)
    return value


def record_to_conversation(
    record: Mapping[str, Any], format: str, field_map: Mapping[str, str] | None = None
) -> list[dict[str, str]]:
    """One row of `format` (not "text") as a validated conversation. Errors name the field."""
    columns = {name: (field_map or {}).get(name, name) for name in FORMAT_FIELDS[format]}
    if format == "alpaca":
        instruction = _required_string(record, "instruction", columns["instruction"])
        output = _required_string(record, "output", columns["output"])
        extra = _optional_string(record, columns["input"])
        system = _optional_string(record, columns["system"])
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        turns = [{"role": "system", "content": system}] if system else []
        return turns + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if format == "prompt_completion":
        prompt = _required_string(record, "prompt", columns["prompt"])
        completion = _required_string(record, "completion", columns["completion"])
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if format == "sharegpt":
        column = columns["conversations"]
        if column not in record:
            raise DataError("is missing", field=column)
        return normalize_conversation(
            record[column], field=column, role_key="from", content_key="value", require_assistant=False
        )
    if format == "messages":
        column = columns["messages"]
        if column not in record:
            raise DataError("is missing", field=column)
        return normalize_conversation(record[column], field=column, require_assistant=False)
    raise ValueError(f"record_to_conversation: format {format!r} is not a conversation format")


def record_to_text(record: Mapping[str, Any], field_map: Mapping[str, str] | None = None) -> str:
    column = (field_map or {}).get("text", "text")
    return _required_string(record, "text", column)


def _first_turns(rows: Iterable[Mapping[str, Any]], column: str):
    for row in rows:
        value = row.get(column)
        if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) > 0:
            return value
    return None


def detect_format(
    column_names: Sequence[str], sample_rows: Iterable[Mapping[str, Any]] = (), field_map: Mapping[str, str] | None = None
) -> str:
    """The format of a dataset from its columns (and, for list-of-turn columns, the keys of the turns).

    Raises DataError listing the columns when nothing matches, with what to pass instead.
    """
    field_map = dict(field_map or {})
    # A column that field_map renames counts under its canonical name.
    present = set(column_names) | {canonical for canonical, actual in field_map.items() if actual in column_names}
    rows = list(sample_rows)
    for name in _CONVERSATION_COLUMNS:
        actual = field_map.get(name, name)
        if actual in column_names or name in present:
            turns = _first_turns(rows, actual)
            if turns is not None and isinstance(turns[0], Mapping):
                if "from" in turns[0] and "value" in turns[0]:
                    return "sharegpt"
                if "role" in turns[0] and "content" in turns[0]:
                    return "messages"
            elif turns is None and name == "conversations":
                return "sharegpt"
            elif turns is None:
                return "messages"
    if {"instruction", "output"} <= present:
        return "alpaca"
    if {"prompt", "completion"} <= present:
        return "prompt_completion"
    if "text" in present:
        return "text"
    raise DataError(
        f"cannot tell the format from the columns {sorted(column_names)}. Expected one of: "
        "instruction/output[/input] (alpaca), prompt/completion, conversations with from/value (sharegpt), "
        "messages with role/content, or text. Pass format=... and field_map={canonical: your_column}, "
        "e.g. field_map={'instruction': 'question', 'output': 'answer'}"
    )


def _conversation_column(format: str, field_map: Mapping[str, str] | None) -> str:
    canonical = "conversations" if format == "sharegpt" else "messages"
    return (field_map or {}).get(canonical, canonical)


def standardize_sharegpt(
    dataset,
    aliases_for_system: Sequence[str] = ("system",),
    aliases_for_user: Sequence[str] = ("user", "human", "input", "prompter"),
    aliases_for_assistant: Sequence[str] = ("gpt", "assistant", "output", "bot", "chatgpt", "model", "ai"),
    *,
    column: str | None = None,
):
    """ShareGPT turns ({"from", "value"}) -> OpenAI turns ({"role", "content"}), Unsloth's name and arguments.

    `dataset` is a datasets.Dataset (or DatasetDict) with a "conversations" column (or `column`). The
    column keeps its name and now holds [{"role": system|user|assistant, "content": str}]. Turns that
    already use role/content are accepted too. Raises DataError naming the row and the turn for an
    unknown role, a null value, an empty conversation.
    """
    from datasets import DatasetDict

    if isinstance(dataset, DatasetDict):
        return DatasetDict({split: standardize_sharegpt(
            part, aliases_for_system, aliases_for_user, aliases_for_assistant, column=column
        ) for split, part in dataset.items()})
    roles = _role_table(aliases_for_system, aliases_for_user, aliases_for_assistant)
    if column is None:
        column = next((name for name in ("conversations", "conversation", "messages") if name in dataset.column_names), None)
        if column is None:
            raise DataError(f"no conversations column; columns are {dataset.column_names}")
    if len(dataset) == 0:
        raise DataError("the dataset is empty")

    def convert(row, index):
        turns = row[column]
        keys = ("from", "value")
        if isinstance(turns, Sequence) and turns and isinstance(turns[0], Mapping) and "role" in turns[0]:
            keys = ("role", "content")
        try:
            return {column: normalize_conversation(
                turns, field=column, role_key=keys[0], content_key=keys[1], roles=roles, require_assistant=False
            )}
        except DataError as error:
            raise error.located(row=index) from None

    return dataset.map(convert, with_indices=True, desc="standardize_sharegpt")


def to_conversations(
    dataset,
    format: str = "auto",
    field_map: Mapping[str, str] | None = None,
    *,
    locate: Callable[[int], tuple[str | None, int]] | None = None,
    require_assistant: bool = True,
):
    """A datasets.Dataset of any supported format -> (dataset, format).

    Conversation formats become one column "messages" of validated turns; "text" becomes one column
    "text". `locate(i)` maps a dataset index to (source file, row in that file) for error messages.
    Logs what was detected. Raises DataError for an empty dataset, an unknown format, a field_map that
    names a missing column, and every bad row (named by source, row and field).
    """
    source = locate(0)[0] if locate is not None else None
    if len(dataset) == 0:
        raise DataError("the dataset is empty (0 rows)", source=source)
    field_map = dict(field_map or {})
    for canonical, actual in field_map.items():
        if not any(canonical in fields for fields in FORMAT_FIELDS.values()):
            raise DataError(f"field_map key {canonical!r} is not a known field; known: "
                            f"{sorted({f for fields in FORMAT_FIELDS.values() for f in fields})}")
        if actual not in dataset.column_names:
            raise DataError(f"field_map maps {canonical!r} to column {actual!r}, which the dataset does not have; "
                            f"columns are {dataset.column_names}", source=source)
    if format == "auto":
        sample = dataset.select(range(min(len(dataset), 8)))
        format = detect_format(dataset.column_names, sample, field_map)
        logger.info("data format: detected %r from columns %s", format, dataset.column_names)
    elif format not in FORMATS:
        raise DataError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)} or 'auto'")
    else:
        logger.info("data format: %r (given)", format)
    if format in ("sharegpt", "messages"):
        # Turns of either shape are found under any of the usual column names.
        canonical = "conversations" if format == "sharegpt" else "messages"
        if canonical not in field_map and canonical not in dataset.column_names:
            found = next((name for name in _CONVERSATION_COLUMNS if name in dataset.column_names), None)
            if found is not None:
                field_map[canonical] = found
    for name in _REQUIRED[format]:
        column = field_map.get(name, name)
        if column not in dataset.column_names:
            raise DataError(
                f"format {format!r} needs a column {column!r}; columns are {dataset.column_names}"
                + (f" (map yours with field_map={{{name!r}: 'your_column'}})" if name not in field_map else ""),
                source=source,
            )

    def where(index: int) -> dict:
        if locate is None:
            return {"row": index}
        file, row = locate(index)
        return {"source": file, "row": row}

    if format == "text":
        def convert(row, index):
            try:
                return {"text": record_to_text(row, field_map)}
            except DataError as error:
                raise error.located(**where(index)) from None
    else:
        def convert(row, index):
            try:
                turns = record_to_conversation(row, format, field_map)
                if require_assistant and not any(turn["role"] == "assistant" for turn in turns):
                    raise DataError("has no assistant turn, so there is nothing to train on",
                                    field=_conversation_column(format, field_map))
                return {"messages": turns}
            except DataError as error:
                raise error.located(**where(index)) from None

    converted = dataset.map(
        convert, with_indices=True, remove_columns=dataset.column_names, desc=f"reading {format} rows"
    )
    return converted, format
