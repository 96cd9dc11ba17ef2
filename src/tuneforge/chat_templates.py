"""Unsloth's `unsloth.chat_templates` under tuneforge's name: the data calls of Unsloth's notebooks.

    from tuneforge.chat_templates import get_chat_template, standardize_sharegpt, train_on_responses_only

`get_chat_template`, `standardize_sharegpt` and `train_on_responses_only` are tuneforge.data's own
functions (one implementation, here under Unsloth's module path). Added here, because only the
notebooks' API needs them:

* `standardize_data_formats`: Unsloth's newer name for `standardize_sharegpt` (Gemma 3, Qwen 3
  notebooks).
* `to_sharegpt`: merge several columns into one user turn, with `{column}` placeholders and
  `[[...]]` blocks left out when their first column is empty, and optionally chain random rows into
  multi-turn conversations (Unsloth's Ollama / CSV notebooks).
* `CHAT_TEMPLATES`: every accepted template name -> its `ChatTemplate` (notebooks list its keys).
  Unsloth's values are (jinja, eos, ...) tuples; ours are the table's entries.

Unsloth's `apply_chat_template` ({INPUT}/{OUTPUT} strings), `remove_special_tokens` and its
`test_*` helpers are not provided: importing them raises an ImportError that says what to use.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from tuneforge.data.errors import DataError
from tuneforge.data.formats import standardize_sharegpt
from tuneforge.data.masking import train_on_responses_only
from tuneforge.data.templates import _INDEX, get_chat_template, list_chat_templates

logger = logging.getLogger(__name__)

__all__ = [
    "CHAT_TEMPLATES",
    "get_chat_template",
    "list_chat_templates",
    "standardize_data_formats",
    "standardize_sharegpt",
    "to_sharegpt",
    "train_on_responses_only",
]

CHAT_TEMPLATES = dict(sorted(_INDEX.items()))

_NOT_PROVIDED = {
    "apply_chat_template": "write the template as a (jinja, end_of_turn) pair or pick a name for get_chat_template, "
                           "then map tokenizer.apply_chat_template over the dataset",
    "remove_special_tokens": "decode with tokenizer.decode(ids, skip_special_tokens=True)",
    "test_chat_templates": "tuneforge's own tests compare every template with its reference",
    "test_hf_gguf_equivalence": "tuneforge's export tests compare llama.cpp's logits with transformers'",
    "test_construct_chat_template": "tuneforge's own tests cover the template table",
    "construct_chat_template": "write the template as a (jinja, end_of_turn) pair for get_chat_template",
    "create_stopping_criteria": "generation stops on the tokenizer's EOS, which get_chat_template sets to the "
                                "end-of-turn token",
}


def __getattr__(name):
    if name in _NOT_PROVIDED:
        raise ImportError(f"tuneforge.chat_templates.{name} (Unsloth) is not provided by tuneforge: {_NOT_PROVIDED[name]}")
    raise AttributeError(f"module 'tuneforge.chat_templates' has no attribute {name!r}")


def standardize_data_formats(
    dataset,
    tokenizer=None,
    aliases_for_system: Sequence[str] = ("system",),
    aliases_for_user: Sequence[str] = ("user", "human", "input", "prompter"),
    aliases_for_assistant: Sequence[str] = ("gpt", "assistant", "output", "bot", "chatgpt", "model", "ai"),
):
    """Unsloth's newer name for `standardize_sharegpt`: {"from", "value"} turns -> {"role", "content"}.

    tokenizer: accepted because Unsloth's signature has it; text conversations need none (a
        tokenizer is never read here, and passing one changes nothing).
    """
    del tokenizer  # Unsloth reads it only for multimodal rows, which tuneforge does not train on
    return standardize_sharegpt(dataset, aliases_for_system, aliases_for_user, aliases_for_assistant)


_COLUMN = re.compile(r"\{([^{}]+)\}")
_OPTIONAL = re.compile(r"\[\[(.+?)\]\]", flags=re.DOTALL)


def _prompt_pieces(merged_prompt: str, columns: Sequence[str]) -> list[tuple[bool, str, list[str]]]:
    """merged_prompt -> [(optional, text, columns it names)], in order; checks every column exists."""
    for name in _COLUMN.findall(merged_prompt):
        if name not in columns:
            raise DataError(f"to_sharegpt: merged_prompt names column {{{name}}}, which the dataset does not have; "
                            f"columns are {list(columns)}")
    pieces, at = [], 0
    for block in _OPTIONAL.finditer(merged_prompt):
        if block.start() > at:
            text = merged_prompt[at:block.start()]
            pieces.append((False, text, _COLUMN.findall(text)))
        text = block.group(1)
        names = _COLUMN.findall(text)
        if not names:
            raise DataError(f"to_sharegpt: the optional block [[{text}]] names no {{column}}; it needs at least one "
                            "(the block is left out when its first column is empty)")
        pieces.append((True, text, names))
        at = block.end()
    if at < len(merged_prompt):
        text = merged_prompt[at:]
        pieces.append((False, text, _COLUMN.findall(text)))
    return pieces


def _fill(text: str, row: dict) -> str:
    # A regex, not str.format: a value holding braces (code, JSON) is inserted as it is.
    return _COLUMN.sub(lambda match: row[match.group(1)], text)


def to_sharegpt(
    dataset,
    merged_prompt: str = "",
    merged_column_name: str = "instruction",
    output_column_name: str = "output",
    remove_unused_columns: bool = True,
    conversation_extension: int = 1,
    random_state: int = 3407,
):
    """A table dataset -> ShareGPT rows {"conversations": [{"from": "human", ...}, {"from": "gpt", ...}]}.

    merged_prompt: the user turn, e.g. "{instruction}[[\\nYour input is:\\n{input}]]": `{column}` is
        that column's value (None reads as ""); a `[[...]]` block is left out when the first column
        it names is empty. "" keeps `merged_column_name` as it is.
    merged_column_name: the column that receives the merged user text (and is the user turn).
    output_column_name: the column holding the assistant's reply.
    remove_unused_columns: keep only "conversations" (False keeps the other columns too).
    conversation_extension: n > 1 chains each row with n - 1 rows of shuffled copies of the dataset
        (seeds random_state + 1 ... + n - 1) into one multi-turn conversation.
    """
    from datasets import concatenate_datasets

    if conversation_extension < 1:
        raise DataError(f"to_sharegpt: conversation_extension must be >= 1, got {conversation_extension}")
    if "conversations" in dataset.column_names and len(dataset) and isinstance(dataset[0]["conversations"], list):
        raise DataError("to_sharegpt: the dataset already has a conversations column of turns (ShareGPT); "
                        "use standardize_sharegpt on it instead")
    if output_column_name not in dataset.column_names:
        raise DataError(f"to_sharegpt: output_column_name {output_column_name!r} is not a column; "
                        f"columns are {dataset.column_names}")
    if merged_prompt:
        pieces = _prompt_pieces(merged_prompt, dataset.column_names)

        def merge(row):
            values = {name: "" if value is None else str(value) for name, value in row.items()}
            text = "".join(_fill(piece, values) for optional, piece, names in pieces
                           if not optional or values[names[0]] != "")
            return {merged_column_name: text}

        dataset = dataset.map(merge, desc="to_sharegpt: merging columns")
    elif merged_column_name not in dataset.column_names:
        raise DataError(f"to_sharegpt: merged_column_name {merged_column_name!r} is not a column and merged_prompt "
                        f"is empty; columns are {dataset.column_names}")

    def convert(row):
        return {"conversations": [{"from": "human", "value": str(row[merged_column_name])},
                                  {"from": "gpt", "value": str(row[output_column_name])}]}

    drop = dataset.column_names if remove_unused_columns else None
    dataset = dataset.map(convert, remove_columns=drop, desc="to_sharegpt: converting")
    if conversation_extension == 1:
        return dataset
    parts = [dataset.select_columns(["conversations"]).rename_column("conversations", "conversations_0")]
    for k in range(1, conversation_extension):
        parts.append(parts[0].shuffle(seed=random_state + k).rename_column("conversations_0", f"conversations_{k}"))
    chained = concatenate_datasets(parts, axis=1)
    names = [f"conversations_{k}" for k in range(conversation_extension)]

    def chain(row):
        return {"conversations": [turn for name in names for turn in row[name]]}

    chained = chained.map(chain, remove_columns=names, desc="to_sharegpt: extending conversations")
    if not remove_unused_columns:
        chained = concatenate_datasets([dataset.remove_columns(["conversations"]), chained], axis=1)
    logger.info("to_sharegpt: %d rows of %d turns each", len(chained), 2 * conversation_extension)
    return chained
