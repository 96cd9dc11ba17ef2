"""The tokenizer half of a GGUF: vocabulary, merges or scores, special ids, chat template.

Read from the Hugging Face tokenizer's own `tokenizer.json` (the `tokenizers` backend), so the
GGUF tokenises exactly as the tokenizer it came from. Two llama.cpp tokenizer models:

- "gpt2": byte-level BPE (SmolLM2, Qwen, Llama 3): tokens + merges, and a pre-tokenizer name
  telling llama.cpp which split regex to apply (`tokenizer.ggml.pre`).
- "llama": SentencePiece-style (Gemma, Llama 2, Mistral): tokens + scores, byte-fallback tokens
  `<0xNN>`; llama.cpp merges the adjacent pair with the highest score, so a BPE piece's score
  is minus the rank of the merge that makes it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# llama.cpp token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Byte-level pre-tokenizer regexes (from the tokenizer.json Split step) -> llama.cpp pre name.
# A signature fragment identifies each; llama.cpp applies its own copy of the same regex.
# llama.cpp's pre names that share a regex (llama-vocab.cpp) need no entry of their own:
# starcoder / refact / command-r are "smollm" (StarCoder 2, Granite 3, Command-R), stablelm2 is
# "qwen2" (StableLM 2), dbrx is "llama-bpe" without ignore_merges (OLMo 2's cl100k-style BPE).
_SPLIT_PRE = (
    (r"\p{N}{1,3}", "llama-bpe"),  # Llama 3: numbers in groups of up to three digits
    (r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|", "qwen2"),  # Qwen 2 / 2.5 / 3: single digits
)
# Falcon (7B / 40B / 180B): punctuation runs, GPT-2's regex, then digits in threes.
_FALCON = [{"type": "Punctuation", "behavior": "Contiguous"}, {"type": "ByteLevel", "use_regex": True},
           {"type": "Digits", "individual_digits": False},
           {"type": "Split", "pattern": {"Regex": "[0-9][0-9][0-9]"}, "behavior": "Isolated", "invert": False}]
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


class UnsupportedTokenizer(ValueError):
    """The tokenizer cannot be written so that llama.cpp tokenises as Hugging Face does."""


@dataclass
class GGUFVocab:
    model: str  # "gpt2" or "llama"
    tokens: list[str]
    token_types: list[int]
    pre: str | None = None
    merges: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    add_space_prefix: bool | None = None
    special_ids: dict[str, int] = field(default_factory=dict)  # bos / eos / unk / pad
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | list | None = None
    rstrip: set[str] = field(default_factory=set)  # added tokens that swallow the whitespace after them

    def general_name(self, name: str, arch: str) -> str:
        """`name` as `general.name`, adjusted for llama.cpp's one name-keyed tokenizer rule.

        llama.cpp gives Phi-3's added tokens the right-strip Hugging Face gives them (the whitespace
        after `<|end|>` belongs to the token) only when general.name contains "phi3" or "phi-3",
        and then looks up </s>, <unk>, <s> and <|endoftext|>, failing to load a vocabulary without
        them. The name says "phi3" exactly when this vocabulary is one that rule fits.
        """
        named = re.search(r"phi-?3", name.lower()) is not None
        fits = arch == "phi3" and self._phi3_rstrip()
        if fits and not named:
            log.info("GGUF general.name %r -> %r: llama.cpp right-strips Phi-3's special tokens (as this "
                     "tokenizer does) only for a model so named", name, f"phi3-{name}")
            return f"phi3-{name}"
        if named and not fits:
            renamed = re.sub(r"(?i)phi(-?)3", r"phi\1_3", name)
            log.info("GGUF general.name %r -> %r: llama.cpp would apply Phi-3's token rules to a model so "
                     "named, which this tokenizer does not follow", name, renamed)
            return renamed
        return name

    def _phi3_rstrip(self) -> bool:
        """This vocabulary tokenises as llama.cpp's Phi-3 rule says (llama-vocab.cpp)."""
        kept = {"<unk>", "<s>", "<|endoftext|>"}
        if not kept | {"</s>"} <= set(self.tokens):
            return False
        special = {token for token, kind in zip(self.tokens, self.token_types) if kind in (CONTROL, USER_DEFINED)}
        return (special - kept) | {"</s>"} == self.rstrip | {"</s>"} and not kept & self.rstrip

    def write(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
                  "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
        for kind, token_id in self.special_ids.items():
            adders[kind](token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def vocab_from_tokenizer(tokenizer, vocab_size: int) -> GGUFVocab:
    """tokenizer: a transformers fast tokenizer; vocab_size: rows of the model's embedding."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedTokenizer(f"{type(tokenizer).__name__} has no `tokenizers` backend (tokenizer.json); "
                                   "GGUF export needs a fast tokenizer")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model["type"] == "BPE" and not model.get("byte_fallback") and _is_byte_level(spec):
        vocab = _gpt2_vocab(spec, vocab_size)
    elif model["type"] in ("BPE", "Unigram") and _is_metaspace(spec):
        vocab = _spm_vocab(spec, vocab_size)
    else:
        raise UnsupportedTokenizer(f"tokenizer model {model['type']} with pre-tokenizer "
                                   f"{json.dumps(spec.get('pre_tokenizer'))} has no llama.cpp equivalent here")
    _special(vocab, tokenizer, vocab_size)
    return vocab


def _steps(node: dict | None) -> list[dict]:
    if not node:
        return []
    if node["type"] == "Sequence":
        return [step for child in node.get("pretokenizers", node.get("normalizers", [])) for step in _steps(child)]
    return [node]


def _is_byte_level(spec: dict) -> bool:
    return any(step["type"] == "ByteLevel" for step in _steps(spec.get("pre_tokenizer")))


def _is_metaspace(spec: dict) -> bool:
    pre = [s["type"] for s in _steps(spec.get("pre_tokenizer"))]
    normal = [s for s in _steps(spec.get("normalizer"))]
    replaces_space = any(s["type"] == "Replace" and s.get("content") == "\u2581" for s in normal)
    return "Metaspace" in pre or replaces_space


def _gpt2_pre(spec: dict) -> str:
    """The llama.cpp pre-tokenizer whose regex matches this tokenizer.json's split steps."""
    steps = _steps(spec.get("pre_tokenizer"))
    kinds = [step["type"] for step in steps]
    byte_level = next(step for step in steps if step["type"] == "ByteLevel")
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True) and not byte_level.get("add_prefix_space"):
        return "gpt-2"
    if (kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
            and byte_level.get("use_regex", True)):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True):
        pattern = steps[0]["pattern"].get("Regex", "")
        for fragment, name in _SPLIT_PRE:
            if fragment in pattern:
                # llama.cpp's llama-bpe takes a word that is in the vocabulary whole (Llama 3's
                # tokenizer.json says ignore_merges); dbrx runs the same regex through the merges.
                if name == "llama-bpe" and not spec["model"].get("ignore_merges", False):
                    return "dbrx"
                return name
    if len(steps) == len(_FALCON) and all(_has(step, want) for step, want in zip(steps, _FALCON)):
        return "falcon"
    raise UnsupportedTokenizer("no llama.cpp pre-tokenizer known to match "
                               f"{json.dumps(spec.get('pre_tokenizer'))}")


def _has(step: dict, want: dict) -> bool:
    """Every key of `want` has its value in `step` (a ByteLevel's use_regex defaults to true)."""
    defaults = {"use_regex": True} if step.get("type") == "ByteLevel" else {}
    return all(step.get(key, defaults.get(key)) == value for key, value in want.items())


def _added(spec: dict) -> dict[int, dict]:
    return {token["id"]: token for token in spec.get("added_tokens", [])}


def _gpt2_vocab(spec: dict, vocab_size: int) -> GGUFVocab:
    model = spec["model"]
    by_id = {index: token for token, index in model["vocab"].items()}
    added = _added(spec)
    for index, token in added.items():
        by_id[index] = token["content"]
    tokens, types = _fill(by_id, vocab_size)
    for index, token in added.items():
        if index < vocab_size:
            types[index] = CONTROL if token.get("special") else USER_DEFINED
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in model.get("merges", [])]
    return GGUFVocab("gpt2", tokens, types, pre=_gpt2_pre(spec), merges=merges)


def _spm_vocab(spec: dict, vocab_size: int) -> GGUFVocab:
    model = spec["model"]
    added = _added(spec)
    if model["type"] == "Unigram":
        pieces = model["vocab"]  # [[piece, score], ...] in id order
        by_id = {index: piece for index, (piece, _) in enumerate(pieces)}
        score_of = {index: float(score) for index, (_, score) in enumerate(pieces)}
        unk = model.get("unk_id")
    else:
        by_id = {index: token for token, index in model["vocab"].items()}
        # llama.cpp merges by highest score: a piece made by merge k scores -k, so merges apply in
        # the BPE's own order; pieces no merge makes score below all of them.
        rank = {}
        for k, pair in enumerate(model.get("merges", [])):
            left, right = pair if isinstance(pair, list) else pair.split(" ", 1)
            rank.setdefault(left + right, k)
        count = len(rank)
        score_of = {index: -float(rank[piece]) if piece in rank else -float(count + index)
                    for index, piece in by_id.items()}
        unk_token = model.get("unk_token")
        unk = model["vocab"].get(unk_token) if unk_token is not None else None
    for index, token in added.items():
        by_id[index] = token["content"]
    tokens, types = _fill(by_id, vocab_size)
    scores = [score_of.get(index, 0.0) for index in range(vocab_size)]
    for index, piece in enumerate(tokens):
        if types[index] == NORMAL and _BYTE_TOKEN.match(piece):
            types[index] = BYTE
    for index, token in added.items():
        if index < vocab_size:
            types[index] = CONTROL if token.get("special") else USER_DEFINED
            scores[index] = 0.0
    if unk is not None and unk < vocab_size:
        types[unk] = UNKNOWN
    return GGUFVocab("llama", tokens, types, scores=scores, add_space_prefix=_adds_space_prefix(spec))


def _adds_space_prefix(spec: dict) -> bool:
    """True where the tokenizer prepends "▁" to the text (Llama 2 / Mistral), False for Gemma."""
    for step in _steps(spec.get("normalizer")):
        if step["type"] == "Prepend" and step.get("prepend") == "\u2581":
            return True
    for step in _steps(spec.get("pre_tokenizer")):
        if step["type"] == "Metaspace":
            return step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)
    return False


def _fill(by_id: dict[int, str], vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens for ids 0..vocab_size-1; embedding rows no token uses become unused placeholders."""
    beyond = [index for index in by_id if index >= vocab_size]
    if beyond:
        raise UnsupportedTokenizer(f"tokenizer has {len(beyond)} token id(s) >= the model's vocab_size "
                                   f"{vocab_size} (e.g. {beyond[0]}): resize the embeddings first")
    tokens, types = [], []
    for index in range(vocab_size):
        if index in by_id:
            tokens.append(by_id[index])
            types.append(NORMAL)
        else:
            tokens.append(f"[PAD{index}]")
            types.append(UNUSED)
    padded = vocab_size - len(by_id)
    if padded:
        log.info("GGUF vocabulary: %d embedding row(s) have no token; written as unused [PAD<id>]", padded)
    return tokens, types


def _special(vocab: GGUFVocab, tokenizer, vocab_size: int) -> None:
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None and token_id < vocab_size:
            vocab.special_ids[kind] = int(token_id)
    # Whether HF adds BOS / EOS is read off what the tokenizer actually does, not its flags.
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos, eos = vocab.special_ids.get("bos"), vocab.special_ids.get("eos")
    vocab.add_bos = bos is not None and len(probe) > 0 and probe[0] == bos
    vocab.add_eos = eos is not None and len(probe) > 0 and probe[-1] == eos
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab.rstrip = {token["content"] for token in backend.get("added_tokens", []) if token.get("rstrip")}
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = [{"name": name, "template": text} for name, text in template.items()]
    vocab.chat_template = template
