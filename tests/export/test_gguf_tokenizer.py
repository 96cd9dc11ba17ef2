"""The GGUF vocabulary tokenises in llama.cpp exactly as the Hugging Face tokenizer it came from."""

from __future__ import annotations

import json

import pytest
from export_helpers import llama_cpp_quiet
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tuneforge.export.gguf import write_gguf
from tuneforge.export.gguf_tokenizer import UnsupportedTokenizer, vocab_from_tokenizer
from tuneforge.export.merge import ModuleSource
from tuneforge.testing import tiny_model

pytest.importorskip("llama_cpp")

TEXTS = ["Hello world! 123 4567 and 89.", "price: 12,345.67 (555) 123-4567; ok!!! ...",  "  multiple   spaces\n\n\ttabs\r\n", "Café déjà vu — naïve ☕ 漢字",
         "I'm you'll WE'RE they'd", "x=1+2*3; print(x)\n", "<|im_start|>user\nHi<|im_end|>\n"]
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
_QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3 = _QWEN2.replace(r"\p{N}|", r"\p{N}{1,3}|")
_FALCON = {"type": "Sequence", "pretokenizers": [  # tiiuae/falcon-7b's, verbatim
    {"type": "Punctuation", "behavior": "Contiguous"}, dict(_BYTE_LEVEL, use_regex=True),
    {"type": "Digits", "individual_digits": False},
    {"type": "Split", "pattern": {"Regex": "[0-9][0-9][0-9]"}, "behavior": "Isolated", "invert": False}]}
PRE_TOKENIZERS = {
    "gpt-2": dict(_BYTE_LEVEL, use_regex=True),
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                     dict(_BYTE_LEVEL, use_regex=True)]},
    "qwen2": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _QWEN2}, "behavior": "Isolated", "invert": False}, _BYTE_LEVEL]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _LLAMA3}, "behavior": "Isolated", "invert": False}, _BYTE_LEVEL]},
    # The same regex, BPE merges applied to every word (OLMo 2's cl100k-style tokenizer).
    "dbrx": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _LLAMA3}, "behavior": "Isolated", "invert": False}, _BYTE_LEVEL]},
    "falcon": _FALCON,
}
# tokenizer.json model settings that go with a pre-tokenizer: Llama 3's BPE takes a word in the
# vocabulary whole.
MODEL_SETTINGS = {"llama-bpe": {"ignore_merges": True}}


def with_pre_tokenizer(tokenizer, pre: dict, **model_settings):
    from tokenizers import Tokenizer

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["pre_tokenizer"] = pre
    spec["model"].update(model_settings)
    rebuilt = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                      bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
                                      unk_token=tokenizer.unk_token, pad_token=tokenizer.pad_token)
    rebuilt.chat_template = tokenizer.chat_template
    return rebuilt


@pytest.mark.parametrize("pre", list(PRE_TOKENIZERS))
def test_byte_level_pre_tokenizers_match_llama_cpp(pre, smollm2_dir, tmp_path):
    tokenizer = with_pre_tokenizer(AutoTokenizer.from_pretrained(smollm2_dir), PRE_TOKENIZERS[pre],
                                   **MODEL_SETTINGS.get(pre, {}))
    assert vocab_from_tokenizer(tokenizer, 49152).pre == pre
    model = tiny_model("llama", vocab_size=49152, num_hidden_layers=1)
    path = write_gguf(ModuleSource(model), tokenizer, tmp_path / "vocab.gguf", "f16", progress=False)
    llm = llama_cpp_quiet(path, vocab_only=True)
    try:
        for text in TEXTS:
            want = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, text
            assert llm.detokenize(want, special=True).decode() == text
    finally:
        llm.close()


def test_unknown_pre_tokenizer_is_refused(smollm2_dir):
    odd = {"type": "Sequence", "pretokenizers": [{"type": "Punctuation", "behavior": "Isolated"},
                                                 dict(_BYTE_LEVEL, use_regex=True)]}
    tokenizer = with_pre_tokenizer(AutoTokenizer.from_pretrained(smollm2_dir), odd)
    with pytest.raises(UnsupportedTokenizer, match="no llama.cpp pre-tokenizer"):
        vocab_from_tokenizer(tokenizer, 49152)


def test_vocab_larger_than_the_embedding_is_refused(smollm2_dir):
    with pytest.raises(UnsupportedTokenizer, match="resize the embeddings"):
        vocab_from_tokenizer(AutoTokenizer.from_pretrained(smollm2_dir), 1000)


def phi3_like_tokenizer(rstrip: bool):
    """A small byte-level BPE with Phi-3's special tokens; its chat markers right-strip when `rstrip`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(TEXTS * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.add_special_tokens([AddedToken(token, rstrip=rstrip, normalized=False)
                                for token in ("<|user|>", "<|assistant|>", "<|end|>")])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("rstrip", [True, False], ids=["phi-3-rstrip", "no-rstrip"])
def test_phi3_special_tokens_strip_whitespace_as_in_hf(rstrip, tmp_path):
    # llama.cpp right-strips Phi-3's special tokens only for a model whose general.name says phi3:
    # the writer names the file so exactly when the tokenizer's added tokens right-strip.
    tokenizer = phi3_like_tokenizer(rstrip)
    model = tiny_model("phi3", vocab_size=len(tokenizer), num_hidden_layers=1)
    path = write_gguf(ModuleSource(model), tokenizer, tmp_path / "vocab.gguf", "f16", name="my-phi-3-ft",
                      progress=False)
    llm = llama_cpp_quiet(path, vocab_only=True)
    try:
        assert ("phi-3" in llm.metadata["general.name"]) == rstrip, llm.metadata["general.name"]
        text = "<|user|>\nHi there <|end|>\n<|assistant|>\n Hello<|end|>\n"
        want = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == want
    finally:
        llm.close()


def test_phi3_name_on_a_vocabulary_without_its_tokens_still_loads(smollm2_dir, tmp_path):
    # llama.cpp looks up </s> and <unk> for a model named phi3; SmolLM2's vocabulary has neither.
    model = tiny_model("llama", vocab_size=49152, num_hidden_layers=1)
    path = write_gguf(ModuleSource(model), AutoTokenizer.from_pretrained(smollm2_dir), tmp_path / "v.gguf", "f16",
                      name="phi3-distilled", progress=False)
    llm = llama_cpp_quiet(path, vocab_only=True)
    try:
        assert "phi3" not in llm.metadata["general.name"].lower()
    finally:
        llm.close()
