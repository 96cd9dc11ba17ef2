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

* `apply_chat_template`: a prompt format written as text with `{SYSTEM}`, `{INPUT}`, `{OUTPUT}`
  (Unsloth's Ollama notebook) -> a chat template on the tokenizer, and a "text" column.

Unsloth's `remove_special_tokens`, `construct_chat_template` and its `test_*` helpers are not
provided: importing them raises an ImportError that says what to use.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from tuneforge.data.errors import DataError
from tuneforge.data.formats import standardize_sharegpt
from tuneforge.data.masking import train_on_responses_only
from tuneforge.data.templates import _INDEX, ChatTemplate, get_chat_template, list_chat_templates

logger = logging.getLogger(__name__)

__all__ = [
    "CHAT_TEMPLATES",
    "apply_chat_template",
    "get_chat_template",
    "list_chat_templates",
    "standardize_data_formats",
    "standardize_sharegpt",
    "to_sharegpt",
    "train_on_responses_only",
]

CHAT_TEMPLATES = dict(sorted(_INDEX.items()))

_NOT_PROVIDED = {
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


DEFAULT_SYSTEM_MESSAGE = ("Below are some instructions that describe some tasks. Write responses that "
                          "appropriately complete each request.")


def template_from_text(text: str, tokenizer, default_system_message: str | None = DEFAULT_SYSTEM_MESSAGE) -> ChatTemplate:
    """A prompt format written as text -> a ChatTemplate (Unsloth's apply_chat_template format).

    `text` holds one `{INPUT}` (the user's message) and one `{OUTPUT}` (the reply), optionally a
    `{SYSTEM}`. Where the turns are cut:
      * before {INPUT}: with {SYSTEM}, the system part runs up to {SYSTEM}, the text that ends a
        reply (if it follows) and whitespace; the rest opens each user turn. Without {SYSTEM}, text
        up to the last blank line is a header written once; the last paragraph opens each user turn.
      * between {INPUT} and {OUTPUT}: closes the user turn and opens the reply.
      * after {OUTPUT}: ends the reply; the tokenizer's EOS is added when it is not there, as Unsloth
        does (a one-token end marker such as <|im_end|> becomes the end-of-turn token instead).
    """
    for mark in ("{INPUT}", "{OUTPUT}"):
        if text.count(mark) != 1:
            raise DataError(f"apply_chat_template: the template must hold {mark} exactly once (found "
                            f"{text.count(mark)}); write one user turn and one reply, e.g. "
                            "'### Instruction:\\n{INPUT}\\n\\n### Response:\\n{OUTPUT}'")
    start, middle = text.index("{INPUT}"), text.index("{OUTPUT}")
    if middle < start:
        raise DataError("apply_chat_template: {OUTPUT} must come after {INPUT}")
    before, between = text[:start], text[start + len("{INPUT}"):middle]
    after = text[middle + len("{OUTPUT}"):]
    end, suffix = after.rstrip(), after[len(after.rstrip()):]
    eos = tokenizer.eos_token
    if end and _one_token(tokenizer, end):
        assistant, end_of_turn = "{content}" + end, end
    elif eos and end.endswith(eos):
        assistant, end_of_turn = "{content}" + end[: -len(eos)] + "{eos_token}", "{eos_token}"
    else:
        assistant, end_of_turn = "{content}" + end + "{eos_token}", "{eos_token}"
    system, header, gap = None, "", ""
    if "{SYSTEM}" in before:
        cut = before.index("{SYSTEM}") + len("{SYSTEM}")
        if end and before.startswith(end, cut):
            cut += len(end)
        gap = before[cut:][: len(before[cut:]) - len(before[cut:].lstrip())]
        system, user_open = before[: cut + len(gap)].replace("{SYSTEM}", "{content}"), before[cut + len(gap):]
    else:
        blank = before.rstrip("\n").rfind("\n\n")
        if blank != -1:
            header, user_open, gap = before[: blank + 2], before[blank + 2:], "\n\n"
        else:
            user_open = before
    if not user_open:
        raise DataError("apply_chat_template: no text opens the user turn before {INPUT} (e.g. 'USER: {INPUT}')")
    # Between a reply and the next user turn: the template's own whitespace after {OUTPUT}, else the
    # whitespace it puts between the system part (or header) and the first user turn.
    return ChatTemplate(
        name="custom", bos=header, system=system,
        default_system=default_system_message if system is not None else None,
        user=user_open + "{content}", assistant_prefix=between, assistant=assistant,
        assistant_suffix=suffix or gap, last_assistant_suffix=suffix,
        end_of_turn=end_of_turn, source="apply_chat_template",
    )


def _one_token(tokenizer, text: str) -> bool:
    ids = tokenizer.convert_tokens_to_ids([text])
    return bool(ids) and ids[0] is not None and ids[0] != tokenizer.unk_token_id \
        and tokenizer.convert_ids_to_tokens(ids[0]) == text


def apply_chat_template(dataset, tokenizer=None, chat_template: str = "", default_system_message: str | None =
                        DEFAULT_SYSTEM_MESSAGE, extra_eos_tokens=None):
    """Unsloth's apply_chat_template: `chat_template` (text with {SYSTEM}, {INPUT}, {OUTPUT}; see
    template_from_text) becomes the tokenizer's chat template (get_chat_template, EOS set to its end
    of turn), and the dataset's "conversations" (role/content, after standardize_sharegpt) are
    rendered into a "text" column. Returns the dataset.

    extra_eos_tokens: not supported (raises); the reply ends with the template's end or EOS.
    """
    if tokenizer is None:
        raise DataError("apply_chat_template: pass tokenizer=")
    if extra_eos_tokens:
        raise NotImplementedError("apply_chat_template: extra_eos_tokens is not supported; the reply ends with "
                                  "the text after {OUTPUT}, or the tokenizer's EOS")
    column = next((name for name in ("conversations", "messages") if name in dataset.column_names), None)
    if column is None:
        raise DataError(f"apply_chat_template: no conversations column; columns are {dataset.column_names}")
    get_chat_template(tokenizer, template_from_text(chat_template, tokenizer, default_system_message))

    def render(rows):
        return {"text": [tokenizer.apply_chat_template(list(turns), tokenize=False) for turns in rows[column]]}

    return dataset.map(render, batched=True, desc="apply_chat_template")
