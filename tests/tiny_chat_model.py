"""A tiny chat model folder for end-to-end runs on the CPU: `tuneforge train | chat | eval` on it
take seconds, where SmolLM2-135M takes minutes.

The model is `tiny_model("llama")` (hidden 64, 2 layers, vocab 317). Its tokenizer is a byte-level
BPE with 317 entries trained on the shipped instructions, carrying SmolLM2's chat template and
special tokens. SmolLM2's own 49k-entry tokenizer would make the [tokens x vocab] logits the whole
cost of a step (about 3 s a step on this 2-core machine instead of a few tens of ms).
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _training_texts():
    from tuneforge.data.sources import default_dataset_path

    with default_dataset_path().open() as handle:
        for line in handle:
            row = json.loads(line)
            yield "\n".join([row["instruction"], row["input"], row["output"]])


def tiny_tokenizer(vocab_size: int = 317):
    """Byte-level BPE (any text encodes), SmolLM2's chat template and special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from tuneforge.models.shipped import smollm2_path

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_training_texts(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = AutoTokenizer.from_pretrained(smollm2_path()).chat_template
    return tokenizer


def save_tiny_chat_model(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny Llama and its tokenizer to `folder` (an HF model folder); returns it."""
    from tuneforge.testing import tiny_model

    folder = Path(folder)
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", seed=seed, vocab_size=len(tokenizer))
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
