"""Tokenizers for the data tests, none from the network.

smollm2: the real SmolLM2-135M-Instruct tokenizer (byte-level BPE, 49k vocab, ChatML special tokens),
from the folder `tuneforge.models.shipped` converts once. Every test gets its own copy, because
get_chat_template changes a tokenizer in place.

spiece: a tiny tokenizer built here with the `tokenizers` library in SentencePiece style: a
Metaspace pre-tokenizer that prepends "▁" at the start of every call, which is what makes per-piece
tokenization hard (Llama 2 and Mistral tokenizers behave so).
"""

import copy

import pytest

@pytest.fixture(scope="session")
def _smollm2_tokenizer():
    from transformers import AutoTokenizer

    from tuneforge.models.shipped import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path())


@pytest.fixture
def smollm2(_smollm2_tokenizer):
    return copy.deepcopy(_smollm2_tokenizer)


@pytest.fixture(scope="session")
def _spiece_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        "Hello! Hi, how can I help? What is 2+2? 2+2 equals 4.\n",
        "[INST] You are a helpful assistant.\n\nHello [/INST] Sure, here it is. </s>",
        "the quick brown fox jumps over the lazy dog\n" * 3,
    ]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    # "▁" before the start of every call (SentencePiece's dummy prefix); newlines stay single tokens,
    # as Llama's byte-fallback <0x0A> does.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture
def spiece(_spiece_tokenizer):
    return copy.deepcopy(_spiece_tokenizer)
