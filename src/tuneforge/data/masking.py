"""Labels for response-only training: -100 everywhere except the tokens the assistant writes.

Two ways in:

`tokenize_conversation(messages, tokenizer)` -- exact, used by `prepare_dataset`. The chat template
is rendered once; the characters the assistant writes (its text and its end-of-turn token, never the
template's header before it nor the newline after it) are found from the template's
`{% generation %}` tags (every template of `tuneforge.data.templates` has them), or, for a model's
own template without tags, by rendering the conversation turn by turn (the text between "prompt
with generation header" and "prompt plus the reply" is the reply). The text is then cut at those
boundaries and each piece tokenized on its own, so a token never straddles prompt and reply.

    Policy when a tokenizer would merge across a boundary (a prompt ending in a space, a reply that
    starts with one): the pieces' tokenization is kept. It decodes to the same text, its prompt
    tokens are exactly what `apply_chat_template(..., add_generation_prompt=True)` gives at
    inference, and the reply tokens are what the model must generate after that prompt. Such rows
    are flagged (`TokenizedConversation.differs_from_one_shot`) and counted; tokenizers that add a prefix space at
    the start of every call (SentencePiece) are handled by encoding each later piece after a newline
    and dropping the newline's ids, as transformers does.

`train_on_responses_only(trainer, instruction_part, response_part)` -- Unsloth's function, for a TRL
SFTTrainer whose dataset is already tokenized: labels are kept from each `response_part` up to and
including the end-of-turn token (or, without one, up to the next `instruction_part`), everything
else becomes -100. With no parts given they come from the tokenizer's template.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tuneforge.data.errors import DataError
from tuneforge.data.templates import has_generation_tags, resolve_template, template_for_tokenizer

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class TokenizedConversation:
    """input_ids/labels: [tokens]. differs_from_one_shot: tokenizing the whole text at once gives other
    ids (a token would straddle a prompt/reply boundary); see the module docstring for the policy."""

    input_ids: list[int]
    labels: list[int]
    differs_from_one_shot: bool = False

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def _template_kwargs(tokenizer) -> dict:
    kwargs = dict(getattr(tokenizer, "special_tokens_map", {}) or {})
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            kwargs[name] = str(value)
    return kwargs


def _render(template: str, messages, tokenizer, *, add_generation_prompt=False, with_spans=False, **kwargs):
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, indices = render_jinja_template(
        conversations=[list(messages)],
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        return_assistant_tokens_mask=with_spans,
        **{**_template_kwargs(tokenizer), **kwargs},
    )
    return (rendered[0], indices[0]) if with_spans else rendered[0]


def _resolve_jinja(tokenizer, chat_template) -> str:
    if chat_template is None:
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise DataError(
                "the tokenizer has no chat template; call get_chat_template(tokenizer, '<name>') first "
                "or pass chat_template="
            )
        return template
    if isinstance(chat_template, str) and ("{%" in chat_template or "{{" in chat_template):
        return chat_template
    if isinstance(chat_template, str):
        return resolve_template(chat_template).jinja()
    return chat_template.jinja()


def _spans_by_prefix(template: str, messages, tokenizer, **kwargs) -> tuple[str, list[tuple[int, int]]]:
    """Assistant spans of a template without generation tags: render turn by turn and compare."""
    full = _render(template, messages, tokenizer, **kwargs)
    eos = getattr(tokenizer, "eos_token", None)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(template, messages[:i], tokenizer, add_generation_prompt=True, **kwargs)
        upto = _render(template, messages[: i + 1], tokenizer, **kwargs)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise DataError(
                "this chat template renders a turn differently once later turns follow, so the assistant's "
                "tokens cannot be found by rendering turn by turn; use a named template "
                "(get_chat_template(tokenizer, name)), a template with {% generation %} tags, or "
                "train_on_responses_only=False"
            )
        start, end = len(before), len(upto)
        # Text the template writes after the end-of-turn token (a newline) is not the assistant's.
        if eos and eos in full[start:end]:
            end = full.rindex(eos, start, end) + len(eos)
        spans.append((start, end))
    return full, spans


def assistant_spans(messages, tokenizer, chat_template=None, **template_kwargs) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans the assistant writes."""
    template = _resolve_jinja(tokenizer, chat_template)
    if has_generation_tags(template):
        text, spans = _render(template, messages, tokenizer, with_spans=True, **template_kwargs)
        return text, [tuple(span) for span in spans]
    return _spans_by_prefix(template, list(messages), tokenizer, **template_kwargs)


def _newline_ids(tokenizer) -> list[int]:
    return tokenizer("\n", add_special_tokens=False)["input_ids"]


_PREFIX_SPACE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _adds_prefix_space(tokenizer) -> bool:
    """True for tokenizers (SentencePiece-style) that put a space before the start of every call."""
    if tokenizer in _PREFIX_SPACE:
        return _PREFIX_SPACE[tokenizer]
    newline = _newline_ids(tokenizer)
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    after = tokenizer("\na", add_special_tokens=False)["input_ids"]
    result = after[: len(newline)] == newline and after[len(newline):] != plain
    _PREFIX_SPACE[tokenizer] = result
    return result


def encode_piece(tokenizer, text: str, *, first: bool) -> list[int]:
    """Token ids of `text` as a piece of a longer text (not its start, unless `first`)."""
    if not text:
        return []
    if first or not _adds_prefix_space(tokenizer):
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    newline = _newline_ids(tokenizer)
    ids = tokenizer("\n" + text, add_special_tokens=False)["input_ids"]
    if ids[: len(newline)] == newline:
        return ids[len(newline):]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_spans(tokenizer, text: str, spans: Sequence[tuple[int, int]], *, check: bool = True) -> TokenizedConversation:
    """Tokenize `text` piece by piece at the span boundaries; labels kept inside the spans only."""
    pieces, cursor = [], 0
    for start, end in sorted(spans):
        if start < cursor or end < start or end > len(text):
            raise ValueError(f"bad assistant span {(start, end)} in a text of {len(text)} characters")
        pieces.append((text[cursor:start], False))
        pieces.append((text[start:end], True))
        cursor = end
    pieces.append((text[cursor:], False))
    input_ids, labels, first = [], [], True
    for piece, trained in pieces:
        if not piece:
            continue
        ids = encode_piece(tokenizer, piece, first=first)
        first = False
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    differs = False
    if check and len(pieces) > 1:
        differs = tokenizer(text, add_special_tokens=False)["input_ids"] != input_ids
    return TokenizedConversation(input_ids, labels, differs)


def tokenize_conversation(
    messages: Sequence[Mapping[str, str]],
    tokenizer,
    *,
    chat_template=None,
    train_on_responses_only: bool = True,
    **template_kwargs,
) -> TokenizedConversation:
    """One conversation -> input_ids and labels (-100 on system/user/template tokens).

    chat_template: None (the tokenizer's), a table name, a ChatTemplate or a Jinja string.
    With train_on_responses_only=False every token is trained (labels == input_ids).
    """
    text, spans = assistant_spans(messages, tokenizer, chat_template, **template_kwargs)
    if not train_on_responses_only:
        spans = [(0, len(text))] if text else []
    if train_on_responses_only and not spans:
        raise DataError("the conversation has no assistant turn, so there is nothing to train on")
    return tokenize_spans(tokenizer, text, spans)


# --- train_on_responses_only for a TRL trainer -------------------------------------------------------


def _variants(tokenizer, text: str) -> list[list[int]]:
    """The ways `text` can appear as token ids inside a longer text (alone, or after a newline)."""
    found = []
    alone = tokenizer(text, add_special_tokens=False)["input_ids"]
    found.append(alone)
    newline = _newline_ids(tokenizer)
    after = tokenizer("\n" + text, add_special_tokens=False)["input_ids"]
    if after[: len(newline)] == newline and after[len(newline):] and after[len(newline):] != alone:
        found.append(after[len(newline):])
    stripped = text.strip()
    if stripped and stripped != text:
        found.append(tokenizer(stripped, add_special_tokens=False)["input_ids"])
    unique = []
    for ids in found:
        if ids and ids not in unique:
            unique.append(ids)
    return sorted(unique, key=len, reverse=True)


def _match(ids: Sequence[int], i: int, variants: list[list[int]]) -> int:
    for variant in variants:
        if list(ids[i : i + len(variant)]) == variant:
            return len(variant)
    return 0


def response_mask(
    input_ids: Sequence[int],
    instruction_ids: list[list[int]],
    response_ids: list[list[int]],
    end_ids: list[list[int]] | None = None,
    seq_lengths: Sequence[int] | None = None,
) -> list[bool]:
    """True for tokens after a response marker, up to and including the end-of-turn marker.

    Without end markers a response runs until the next instruction or response marker. `seq_lengths` (packed rows)
    restart the scan at every sample. Markers are lists of token-id variants (see `_variants`).
    """
    keep = [False] * len(input_ids)
    bounds, start = [], 0
    for length in (seq_lengths or [len(input_ids)]):
        bounds.append((start, start + length))
        start += length
    for lo, hi in bounds:
        i, inside = lo, False
        while i < hi:
            # A response marker (re)opens a reply and is not itself trained.
            n = _match(input_ids[:hi], i, response_ids)
            if n:
                inside = True
                i += n
                continue
            if not inside:
                i += 1
                continue
            n = _match(input_ids[:hi], i, end_ids) if end_ids else 0
            if n:
                for j in range(i, min(i + n, hi)):
                    keep[j] = True
                i += n
                inside = False
                continue
            if _match(input_ids[:hi], i, instruction_ids):
                inside = False
                continue
            keep[i] = True
            i += 1
    return keep


@dataclass(frozen=True)
class ResponseParts:
    instruction_part: str
    response_part: str
    end_of_turn: str | None


def find_response_parts(tokenizer, chat_template=None) -> ResponseParts:
    """instruction/response markers and end-of-turn text, from the table or by probing the template."""
    if chat_template is not None and not (isinstance(chat_template, str) and "{%" in chat_template):
        spec = resolve_template(chat_template) if isinstance(chat_template, str) else chat_template
    else:
        spec = template_for_tokenizer(tokenizer) if chat_template is None else None
    if spec is not None:
        end = tokenizer.eos_token if spec.end_of_turn == "{eos_token}" else spec.end_of_turn
        return ResponseParts(spec.user_marker, spec.assistant_marker, end)
    template = _resolve_jinja(tokenizer, chat_template)
    user_a, user_b, reply = "tuneforgeUSERone", "tuneforgeUSERtwo", "tuneforgeREPLY"
    plain = _render(template, [{"role": "user", "content": user_a}], tokenizer)
    prompt = _render(template, [{"role": "user", "content": user_a}], tokenizer, add_generation_prompt=True)
    if not prompt.startswith(plain) or prompt == plain:
        raise DataError("cannot find the response marker of this chat template (no generation prompt); "
                        "pass instruction_part= and response_part=")
    response_part = prompt[len(plain):]
    text = _render(template, [{"role": "user", "content": user_a}, {"role": "assistant", "content": reply},
                              {"role": "user", "content": user_b}], tokenizer)
    between = text[text.index(reply) + len(reply): text.index(user_b)]
    eos = getattr(tokenizer, "eos_token", None)
    end = eos if eos and between.startswith(eos) else None
    instruction_part = between[len(end):] if end else between
    instruction_part = instruction_part.lstrip("\n")
    if not instruction_part.strip():
        raise DataError("cannot find the instruction marker of this chat template; pass instruction_part=")
    logger.info("train_on_responses_only: found instruction_part=%r response_part=%r end_of_turn=%r",
                instruction_part, response_part, end)
    return ResponseParts(instruction_part, response_part, end)


def make_label_masker(tokenizer, instruction_part: str, response_part: str, end_of_turn: str | None = None):
    """A datasets.map function (batched) that sets labels to -100 outside the assistant replies."""
    instruction_ids = _variants(tokenizer, instruction_part)
    response_ids = _variants(tokenizer, response_part)
    end_ids = _variants(tokenizer, end_of_turn) if end_of_turn else None
    if not response_ids:
        raise DataError(f"response_part {response_part!r} tokenizes to nothing")

    def mask(batch):
        labels = []
        old = batch.get("labels")
        seq_lengths = batch.get("seq_lengths")
        for k, ids in enumerate(batch["input_ids"]):
            keep = response_mask(ids, instruction_ids, response_ids, end_ids, seq_lengths[k] if seq_lengths else None)
            base = old[k] if old is not None else ids
            labels.append([label if kept else IGNORE_INDEX for label, kept in zip(base, keep)])
        return {"labels": labels}

    return mask


def train_on_responses_only(
    trainer,
    instruction_part: str | None = None,
    response_part: str | None = None,
    *,
    end_of_turn: str | None = None,
    tokenizer=None,
    num_proc: int | None = None,
    return_function: bool = False,
    **unsupported,
):
    """Train only on the assistant's replies of a TRL SFTTrainer (Unsloth's name and arguments).

    Rewrites the `labels` of `trainer.train_dataset` (and `eval_dataset`) in place and returns the
    trainer. instruction_part/response_part: the text that opens a user turn / precedes a reply, e.g.
    "<|im_start|>user\\n" and "<|im_start|>assistant\\n"; both None: found from the tokenizer's
    template (table entry, else probed). end_of_turn: the text that ends a reply (kept in the labels);
    default: the template's end-of-turn when the parts were found automatically. Rows left with no
    trained token are dropped, with a logged count. return_function=True returns the batched
    map function instead of changing the trainer.
    """
    if unsupported:
        raise NotImplementedError(f"train_on_responses_only: unsupported arguments {sorted(unsupported)}")
    tokenizer = tokenizer or getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
    if tokenizer is None:
        raise DataError("train_on_responses_only: the trainer has no tokenizer; pass tokenizer=")
    if (instruction_part is None) != (response_part is None):
        raise DataError("pass both instruction_part and response_part, or neither to find them from the template")
    if instruction_part is None:
        parts = find_response_parts(tokenizer)
        instruction_part, response_part = parts.instruction_part, parts.response_part
        end_of_turn = end_of_turn if end_of_turn is not None else parts.end_of_turn
    masker = make_label_masker(tokenizer, instruction_part, response_part, end_of_turn)
    if return_function:
        return masker

    def apply(dataset, name):
        if dataset is None:
            return None
        if isinstance(dataset, Mapping):
            return {key: apply(part, f"{name}[{key}]") for key, part in dataset.items()}
        if "input_ids" not in dataset.column_names:
            raise DataError(f"train_on_responses_only: the trainer's {name} is not tokenized (no input_ids column); "
                            "build the SFTTrainer first, then call this")
        masked = dataset.map(masker, batched=True, num_proc=num_proc, desc=f"masking {name} to responses")
        kept = masked.filter(lambda row: any(label != IGNORE_INDEX for label in row["labels"]), num_proc=num_proc)
        dropped = len(masked) - len(kept)
        if dropped:
            logger.warning("train_on_responses_only: %d of %d %s rows have no assistant tokens after masking and "
                           "were dropped (response_part %r never matched)", dropped, len(masked), name, response_part)
        if len(kept) == 0:
            raise DataError(f"train_on_responses_only: no {name} row contains response_part {response_part!r}")
        return kept

    trainer.train_dataset = apply(trainer.train_dataset, "train_dataset")
    if getattr(trainer, "eval_dataset", None) is not None:
        trainer.eval_dataset = apply(trainer.eval_dataset, "eval_dataset")
    return trainer
