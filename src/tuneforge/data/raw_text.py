"""Raw text (continued pre-training, books, code) -> fixed windows of token ids.

    loader = RawTextDataLoader(tokenizer, max_seq_length=2048, stride=256)
    dataset = loader.from_texts(["doc one ...", "doc two ..."])     # or loader.load("corpus.txt")

Documents are tokenized one by one (BOS first when the tokenizer itself puts one there), each
followed by EOS, and joined into one stream; the stream is cut into windows of `max_seq_length`
tokens that start every `max_seq_length - stride` tokens. The first `stride` tokens of every window
but the first repeat the end of the previous window: they are context, so their labels are -100 and
every token of the stream is trained exactly once. The last window may be shorter; a window holding
nothing new is not made.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from tuneforge.data.errors import DataError
from tuneforge.data.masking import IGNORE_INDEX

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".text")


def windows(stream: list[int], max_seq_length: int, stride: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Cut a token stream into windows; returns (input_ids, labels). See the module docstring."""
    if max_seq_length < 1:
        raise DataError(f"max_seq_length must be at least 1, got {max_seq_length}")
    if not 0 <= stride < max_seq_length:
        raise DataError(f"stride (the overlap) must be in [0, max_seq_length), got {stride} with max_seq_length {max_seq_length}")
    step = max_seq_length - stride
    inputs, labels = [], []
    start = 0
    while start < len(stream):
        window = stream[start : start + max_seq_length]
        overlap = 0 if start == 0 else stride
        if len(window) <= overlap:
            break
        inputs.append(window)
        labels.append([IGNORE_INDEX] * overlap + window[overlap:])
        start += step
    return inputs, labels


class RawTextDataLoader:
    """Chunk raw text into training windows. max_seq_length: window length in tokens; stride: overlap.

    add_bos: put the tokenizer's BOS before each document; None (default) follows the tokenizer (what
    `tokenizer("x")` does). add_eos: put EOS after each document (the model learns where text ends).
    """

    def __init__(self, tokenizer, max_seq_length: int = 2048, stride: int = 0, *, add_bos: bool | None = None,
                 add_eos: bool = True):
        windows([], max_seq_length, stride)  # validates the two numbers
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.stride = stride
        if add_bos is None:
            bos = tokenizer.bos_token_id
            probe = tokenizer("x")["input_ids"]
            add_bos = bos is not None and len(probe) > 0 and probe[0] == bos
        if add_bos and tokenizer.bos_token_id is None:
            raise DataError("add_bos=True but the tokenizer has no BOS token")
        if add_eos and tokenizer.eos_token_id is None:
            raise DataError("add_eos=True but the tokenizer has no EOS token; pass add_eos=False")
        self.add_bos = add_bos
        self.add_eos = add_eos

    def document_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.add_bos:
            ids = [self.tokenizer.bos_token_id] + ids
        if self.add_eos:
            ids = ids + [self.tokenizer.eos_token_id]
        return ids

    def chunk(self, texts: Iterable[str]) -> dict[str, list[list[int]]]:
        """texts -> {"input_ids": [...], "labels": [...]}, one entry per window."""
        stream, documents = [], 0
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise DataError(f"must be a string, got {type(text).__name__}", row=index, field="text")
            if text.strip():
                stream += self.document_ids(text)
                documents += 1
        if not stream:
            raise DataError("no text to train on (every document is empty)")
        input_ids, labels = windows(stream, self.max_seq_length, self.stride)
        logger.info("raw text: %d documents, %d tokens -> %d windows of up to %d tokens (overlap %d)",
                    documents, len(stream), len(input_ids), self.max_seq_length, self.stride)
        return {"input_ids": input_ids, "labels": labels}

    def from_texts(self, texts: Iterable[str]):
        """A datasets.Dataset with input_ids and labels."""
        from datasets import Dataset

        return Dataset.from_dict(self.chunk(texts))

    def load(self, path: str | Path):
        """A .txt/.md file, or a folder of them (each file one document)."""
        path = Path(path)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not files:
                raise DataError(f"no {'/'.join(TEXT_SUFFIXES)} files in this folder", source=str(path))
        elif path.is_file():
            files = [path]
        else:
            raise DataError("no such file or folder", source=str(path))
        return self.from_texts(file.read_text(encoding="utf-8") for file in files)
