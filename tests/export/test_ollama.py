"""Ollama Modelfile: its Go TEMPLATE renders conversations exactly as the model's chat template does."""

from __future__ import annotations

import re

import pytest
from transformers import AutoTokenizer

from tuneforge.export.ollama import chat_format_for, render_go_template, write_modelfile
from tuneforge.models.families import all_families

CONVERSATION = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Name a colour."},
]


def ollama_messages(modelfile: str, messages: list[dict]) -> list[dict]:
    """What Ollama passes the template: the Modelfile's SYSTEM first when the chat has no system turn."""
    system = re.search(r'^SYSTEM """(.*?)"""', modelfile, re.S | re.M)
    if system and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": system.group(1)}] + messages
    return messages


def test_smollm2_modelfile_renders_like_the_jinja_template(smollm2_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    gguf = tmp_path / "smollm2.Q8_0.gguf"
    gguf.write_bytes(b"")
    text = write_modelfile(gguf, tokenizer, num_ctx=2048).read_text()
    assert text.startswith("FROM ./smollm2.Q8_0.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER num_ctx 2048" in text
    template = re.search(r'^TEMPLATE """(.*?)"""', text, re.S | re.M).group(1)
    for conversation in (CONVERSATION, [{"role": "system", "content": "Be brief."}] + CONVERSATION):
        want = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        assert render_go_template(template, ollama_messages(text, conversation)) == want


# Every chat format a family exports with (its default in the family table), plus the common ones.
FORMATS = sorted({"chatml", "llama-3", "qwen-2.5", "phi-3", "gemma"}
                 | {spec.chat_template for spec in all_families().values() if spec.gguf_arch})


@pytest.mark.parametrize("name", FORMATS)
def test_table_formats_render_like_their_jinja(name, smollm2_dir, tmp_path):
    from tuneforge.data.templates import get_chat_template

    tokenizer = get_chat_template(AutoTokenizer.from_pretrained(smollm2_dir), name)
    template = chat_format_for(tokenizer)
    assert template is not None and template.name == name
    modelfile = write_modelfile(tmp_path / "m.gguf", tokenizer).read_text()
    # The end of turn (Alpaca's is the tokenizer's EOS) and the next user turn's opener stop Ollama.
    end_of_turn = template.end_of_turn.replace("{eos_token}", tokenizer.eos_token)
    assert f'PARAMETER stop "{end_of_turn}"' in modelfile and "{eos_token}" not in modelfile
    written = re.search(r'^TEMPLATE """(.*?)"""', modelfile, re.S | re.M).group(1)
    # With and without a system message (merged into a user turn by Gemma's and Mistral's formats).
    for conversation in (CONVERSATION, [{"role": "system", "content": "Be brief."}] + CONVERSATION):
        want = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        got = render_go_template(written, ollama_messages(modelfile, conversation))
        # Ollama tokenises with the GGUF's add_bos flag, so the TEMPLATE carries no BOS text.
        assert got == want.removeprefix(template.bos)


def test_unknown_chat_template_leaves_template_to_the_gguf(smollm2_dir, tmp_path, caplog):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.chat_template = "{% for m in messages %}[[{{ m['content'] }}]]{% endfor %}"
    text = write_modelfile(tmp_path / "m.gguf", tokenizer).read_text()
    assert "TEMPLATE" not in text and "no Ollama TEMPLATE" in caplog.text


def test_num_ctx_stays_within_the_gguf_context(tmp_path):
    # Mistral v0.1-style: a sliding window llama.cpp cannot run, so the GGUF declares the window as
    # its context (16 tokens for the tiny model) and Ollama must not be told to go past it.
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tuneforge.data.templates import get_chat_template
    from tuneforge.export.gguf import write_gguf
    from tuneforge.export.merge import ModuleSource
    from tuneforge.testing import tiny_model

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(["[INST] hello [/INST] hi"] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = get_chat_template(PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                                          eos_token="</s>"), "mistral-v3")
    path = write_gguf(ModuleSource(tiny_model("mistral", vocab_size=300)), tokenizer, tmp_path / "m.gguf", "f16",
                      progress=False)
    assert "PARAMETER num_ctx 16\n" in write_modelfile(path, tokenizer, num_ctx=4096).read_text()
