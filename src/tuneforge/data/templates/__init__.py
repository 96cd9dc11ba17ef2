"""Chat templates for 30+ formats (90+ names), and `get_chat_template` (Unsloth's name and arguments).

    tokenizer = get_chat_template(tokenizer, "llama-3.1")
    text = tokenizer.apply_chat_template(messages, tokenize=False)

The formats are data (`table.py`); `list_chat_templates()` names them. `chat_template="auto"` keeps
the template the model ships with. The tokenizer comes back with `.chat_template` set and its EOS
set to the format's end-of-turn token, so generation stops where the assistant's turn ends:

* end-of-turn already a token of the vocabulary: it becomes `eos_token`.
* not in the vocabulary, `map_eos_token=True` (default): the tokenizer's EOS token is renamed to the
  end-of-turn text (same id, so the trained EOS embedding now means "end of turn"; no new rows in
  the embedding matrix). Unsloth does the same.
* not in the vocabulary, `map_eos_token=False`: nothing is renamed; the marker is tokenized as
  plain text (logged), and generation must stop on the string.

Other markers a format writes that the vocabulary lacks (say `<|im_start|>` on a Llama-2 tokenizer)
are tokenized as text and learned as such; the names are logged once.
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Mapping, Sequence

from tuneforge.data.errors import DataError
from tuneforge.data.templates.spec import ChatTemplate, has_generation_tags, strip_generation_tags
from tuneforge.data.templates.table import CHAT_TEMPLATES

logger = logging.getLogger(__name__)

__all__ = [
    "CHAT_TEMPLATES",
    "ChatTemplate",
    "accept_batched_columns",
    "get_chat_template",
    "has_generation_tags",
    "list_chat_templates",
    "render",
    "resolve_template",
    "strip_generation_tags",
    "template_for_tokenizer",
]

_AUTO = ("auto", "model", "native", "default")


def _normalize(name: str) -> str:
    # Unsloth writes "vicuna_old", "vicuna old" and "gemma2_chatml": one spelling per name here.
    return "-".join(name.strip().lower().replace("_", " ").split())


def _build_index() -> dict[str, ChatTemplate]:
    index: dict[str, ChatTemplate] = {}
    for template in CHAT_TEMPLATES:
        for name in (template.name, *template.aliases):
            key = _normalize(name)
            if key in index:
                raise RuntimeError(f"chat template name {name!r} is used twice")
            index[key] = template
    return index


_INDEX = _build_index()


def list_chat_templates(include_aliases: bool = False) -> list[str]:
    """The template names (each distinct format once), or every accepted name."""
    if include_aliases:
        return sorted(_INDEX)
    return [template.name for template in CHAT_TEMPLATES]


def resolve_template(name: str) -> ChatTemplate:
    """The ChatTemplate for a name or alias ("llama-3.2", "qwen2.5", "Gemma_3"...).

    Raises DataError naming the closest known names for anything unknown.
    """
    if not isinstance(name, str):
        raise DataError(f"chat_template must be a name (str), got {type(name).__name__}")
    template = _INDEX.get(_normalize(name))
    if template is None:
        close = difflib.get_close_matches(_normalize(name), list(_INDEX), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise DataError(
            f"unknown chat template {name!r}.{hint} Known formats: {', '.join(list_chat_templates())} "
            f"(or 'auto' for the model's own template)"
        )
    return template


def template_for_tokenizer(tokenizer) -> ChatTemplate | None:
    """The table entry whose Jinja the tokenizer carries (after get_chat_template), else None."""
    current = getattr(tokenizer, "chat_template", None)
    if not isinstance(current, str):
        return None
    for template in CHAT_TEMPLATES:
        try:
            if template.jinja() == current:
                return template
        except ValueError:
            continue
    return None


def render(
    template: str | ChatTemplate,
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = False,
    bos_token: str = "<s>",
    eos_token: str = "</s>",
    **kwargs,
) -> str:
    """Render a table template without a tokenizer, through transformers' own Jinja environment.

    `bos_token`/`eos_token` are what `{eos_token}` formats (alpaca) write.
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    spec = resolve_template(template) if isinstance(template, str) else template
    rendered, _ = render_jinja_template(
        conversations=[list(messages)],
        chat_template=spec.jinja(),
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token,
        eos_token=eos_token,
        **kwargs,
    )
    return rendered[0]


def _single_token_id(tokenizer, text: str) -> int | None:
    """The id of `text` when the vocabulary holds it as one token, else None."""
    ids = tokenizer.convert_tokens_to_ids([text])
    token_id = ids[0] if ids else None
    unk = getattr(tokenizer, "unk_token_id", None)
    if token_id is None or (token_id == unk and text != getattr(tokenizer, "unk_token", None)):
        return None
    if tokenizer.convert_ids_to_tokens(token_id) != text:
        return None
    return token_id


def _rename_token(tokenizer, token_id: int, new_text: str) -> None:
    """Give the vocabulary entry `token_id` the text `new_text` (a fast tokenizer's JSON, edited).

    Keeps the id, so the model's embedding row is reused. The entry stays a special added token:
    `new_text` is matched before the normal pre-tokenization, as the old EOS was.
    """
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise NotImplementedError(
            "map_eos_token needs a fast (tokenizers-backed) tokenizer; pass map_eos_token=False "
            "or load the tokenizer with use_fast=True"
        )
    state = json.loads(backend.to_str())
    old_text = tokenizer.convert_ids_to_tokens(token_id)
    renamed = False
    for entry in state.get("added_tokens", []):
        if entry["id"] == token_id:
            entry["content"] = new_text
            entry["special"] = True
            renamed = True
    vocab = state.get("model", {}).get("vocab")
    if isinstance(vocab, dict) and vocab.get(old_text) == token_id:
        del vocab[old_text]
        vocab[new_text] = token_id
        renamed = True
    if not renamed:
        raise NotImplementedError(f"cannot find token {old_text!r} (id {token_id}) in the tokenizer to rename it")
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))
    # Keep transformers' own view of the added tokens in step with the backend.
    decoder = getattr(tokenizer, "_added_tokens_decoder", None)
    if isinstance(decoder, dict) and token_id in decoder:
        from tokenizers import AddedToken

        old = decoder[token_id]
        decoder[token_id] = AddedToken(new_text, lstrip=getattr(old, "lstrip", False), rstrip=getattr(old, "rstrip", False),
                                       normalized=getattr(old, "normalized", False), special=True)
    encoder = getattr(tokenizer, "_added_tokens_encoder", None)
    if isinstance(encoder, dict):
        encoder.pop(old_text, None)
        encoder[new_text] = token_id


def _set_eos(tokenizer, end_of_turn: str, map_eos_token: bool) -> None:
    old = tokenizer.eos_token
    if end_of_turn == old:
        return
    token_id = _single_token_id(tokenizer, end_of_turn)
    if token_id is not None:
        tokenizer.eos_token = end_of_turn
        logger.info("chat template: EOS %r -> %r (id %d), the end-of-turn token", old, end_of_turn, token_id)
        return
    if not map_eos_token:
        pieces = len(tokenizer(end_of_turn, add_special_tokens=False)["input_ids"])
        logger.warning(
            "chat template: end-of-turn %r is not in the vocabulary; it is tokenized as text (%d tokens) and "
            "EOS stays %r, so generation must stop on the string (map_eos_token=True would rename EOS instead)",
            end_of_turn, pieces, old,
        )
        return
    if tokenizer.eos_token_id is None:
        raise DataError(
            f"map_eos_token: the tokenizer has no EOS token to rename to {end_of_turn!r}; "
            "pass map_eos_token=False or give the tokenizer an EOS token"
        )
    eos_id = tokenizer.eos_token_id
    pad_was_eos = tokenizer.pad_token is not None and tokenizer.pad_token_id == eos_id
    _rename_token(tokenizer, eos_id, end_of_turn)
    tokenizer.eos_token = end_of_turn
    if pad_was_eos:
        tokenizer.pad_token = end_of_turn
    logger.info("chat template: renamed EOS %r (id %d) to the end-of-turn text %r", old, eos_id, end_of_turn)


def _log_missing_markers(tokenizer, template: ChatTemplate) -> None:
    import re

    markers = set()
    for part in (template.bos, template.system or "", template.user, template.assistant_prefix, template.assistant):
        markers.update(re.findall(r"<[^<>\s]{2,40}>|\[/?[A-Z_]{3,20}\]|\[\|[a-z]+\|\]", part))
    missing = sorted(m for m in markers if m != template.end_of_turn and _single_token_id(tokenizer, m) is None)
    if missing:
        logger.info("chat template %s: markers not in the vocabulary, tokenized as text: %s", template.name, ", ".join(missing))


class _BatchedColumns:
    """`tokenizer.apply_chat_template` that also takes a batch of conversations as a datasets
    `Column` or a pandas Series, not only a list.

    Since datasets 4, `dataset["conversations"]` is a lazy Column; transformers treats anything but
    a list or tuple as one conversation and fails on it. Unsloth's Qwen 3 / Gemma 3 notebooks pass
    that column straight in (written for datasets < 4). A module-level class, so that tokenizers
    captured by `dataset.map(..., num_proc=N)` still pickle.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, conversation, *args, **kwargs):
        if not isinstance(conversation, (list, tuple, str, Mapping)) and hasattr(conversation, "__iter__") \
                and hasattr(conversation, "__len__") and len(conversation) > 0:
            first = next(iter(conversation))
            if isinstance(first, (list, tuple)):
                conversation = list(conversation)
        return type(self.tokenizer).apply_chat_template(self.tokenizer, conversation, *args, **kwargs)


def accept_batched_columns(tokenizer):
    """Let `tokenizer.apply_chat_template` take a datasets Column / pandas Series of conversations
    (see _BatchedColumns); returns the tokenizer. Idempotent."""
    if tokenizer is not None and not isinstance(vars(tokenizer).get("apply_chat_template"), _BatchedColumns):
        tokenizer.apply_chat_template = _BatchedColumns(tokenizer)
    return tokenizer


def get_chat_template(
    tokenizer,
    chat_template: str | tuple[str, str] | ChatTemplate = "llama-3.1",
    mapping: Mapping[str, str] | None = None,
    map_eos_token: bool = True,
    system_message: str | None = None,
):
    """Set a chat template on `tokenizer` (in place) and return it, with EOS = the end-of-turn token.

    chat_template: a name from `list_chat_templates()` (aliases such as "llama-3.2", "qwen2.5",
        "gemma-3" included), a ChatTemplate, a (jinja, end_of_turn) pair, or "auto" to keep the
        tokenizer's own template (an error if it has none).
    mapping: read other keys/role names directly, e.g. {"role": "from", "content": "value",
        "user": "human", "assistant": "gpt"} for ShareGPT rows.
    map_eos_token: see the module docstring.
    system_message: replaces the format's default system message (used when a conversation has no
        system turn).
    """
    if isinstance(chat_template, str) and _normalize(chat_template) in _AUTO:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "chat_template='auto' but this tokenizer ships no chat template; pick one of: "
                + ", ".join(list_chat_templates())
            )
        if mapping or system_message is not None:
            raise NotImplementedError("mapping and system_message need a named template, not 'auto'")
        logger.info("chat template: keeping the model's own template")
        return accept_batched_columns(tokenizer)
    if isinstance(chat_template, tuple):
        if len(chat_template) != 2 or not all(isinstance(x, str) for x in chat_template):
            raise DataError("a custom chat_template tuple must be (jinja_template, end_of_turn_text)")
        jinja, end_of_turn = chat_template
        if mapping or system_message is not None:
            raise NotImplementedError("mapping and system_message apply to named templates, not a custom Jinja string")
        tokenizer.chat_template = jinja
        _set_eos(tokenizer, end_of_turn, map_eos_token)
        return accept_batched_columns(tokenizer)
    template = chat_template if isinstance(chat_template, ChatTemplate) else resolve_template(chat_template)
    if system_message is not None:
        template = template.with_default_system(system_message)
    jinja = template.jinja(mapping)
    end_of_turn = tokenizer.eos_token if template.end_of_turn == "{eos_token}" else template.end_of_turn
    if end_of_turn is None:
        raise DataError(f"chat template {template.name!r} ends turns with the tokenizer's EOS, but the tokenizer has none")
    _set_eos(tokenizer, end_of_turn, map_eos_token)
    tokenizer.chat_template = jinja
    _log_missing_markers(tokenizer, template)
    logger.info("chat template: %s (end of turn %r)", template.name, end_of_turn)
    return accept_batched_columns(tokenizer)

