"""Ollama Modelfile: its Go TEMPLATE renders conversations exactly as the model's chat template does."""

from __future__ import annotations

import re

import pytest
from transformers import AutoTokenizer

from tuneforge.export.ollama import chat_format_for, write_modelfile
from tuneforge.models.families import all_families

CONVERSATION = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Name a colour."},
]


def render_go(template: str, messages: list[dict]) -> str:
    """Go text/template semantics for what the exporter writes: `range` (with `$i, $_ :=`), `if` /
    `else if` / `else`, variables (`$x := v`, `$x = v`), the functions eq, ne, and, len, slice and
    index, fields `.Role` / `.Content` / `.Messages` (of `.`, `$` or a parenthesised value), string
    and integer literals, and `{{-` / `-}}` whitespace trimming. Anything else fails the test."""
    tokens: list[tuple[str, str]] = []
    trim_next = False
    for part in re.split(r"(\{\{.*?\}\})", template, flags=re.S):
        if part.startswith("{{"):
            if part.startswith("{{-") and tokens and tokens[-1][0] == "text":
                tokens[-1] = ("text", tokens[-1][1].rstrip())
            tokens.append(("action", part[2:-2].strip("-").strip()))
            trim_next = part.endswith("-}}")
        elif part:
            tokens.append(("text", part.lstrip() if trim_next else part))
            trim_next = False

    def parse(position: int) -> tuple[list, int]:
        """Nodes up to the next `end` / `else ...` action; returns (nodes, index of that action)."""
        nodes = []
        while position < len(tokens):
            kind, value = tokens[position]
            if kind == "text":
                nodes.append(("text", value))
            elif value == "end" or value.startswith("else"):
                return nodes, position
            elif value.startswith("range "):
                names, _, source = value[len("range "):].rpartition(":=")
                body, position = parse(position + 1)
                nodes.append(("range", ([n.strip() for n in names.split(",")] if names else [], source, body)))
            elif value.startswith("if "):
                branches, condition = [], value[len("if "):]
                while True:
                    body, position = parse(position + 1)
                    branches.append((condition, body))
                    action = tokens[position][1]
                    if action == "end":
                        break
                    condition = action[len("else if "):] if action.startswith("else if ") else "true"
                nodes.append(("if", branches))
            elif re.fullmatch(r"\$\w+ :?= .*", value):
                name, _, expression = value.partition(" ")
                nodes.append(("set", (name, expression.split("=", 1)[1].strip())))
            else:
                nodes.append(("print", value))
            position += 1
        return nodes, position

    def evaluate(expression: str, dot, scope: dict):
        words = re.findall(r'"[^"]*"|\(|\)(?:\.\w+)?|[^\s()]+', expression)

        def term(index: int):
            word = words[index]
            if word == "(":
                value, index = call(index + 1)
                field = words[index][1:]  # ")" or ").Role"
                return (value[field.lower()[1:]] if field else value), index + 1
            if word.startswith('"'):
                return word[1:-1], index + 1
            if word.isdigit():
                return int(word), index + 1
            if word == "true":
                return True, index + 1
            base, _, field = word.partition(".") if not word.startswith(".") else ("", "", word[1:])
            value = {"": dot, "$": {"messages": messages}}.get(base, scope.get(base))
            if word.startswith("$") and word not in ("$", "$.Messages") and not field:
                return scope[word], index + 1
            for name in filter(None, field.split(".")):
                value = messages if name == "Messages" else value[name.lower()]
            return value, index + 1

        functions = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "and": lambda a, b: a and b,
                     "len": len, "slice": lambda x, i: x[i:], "index": lambda x, i: x[i]}

        def call(index: int):
            if words[index] in functions:
                function, arguments, index = functions[words[index]], [], index + 1
                while index < len(words) and not words[index].startswith(")"):
                    value, index = term(index)
                    arguments.append(value)
                return function(*arguments), index
            return term(index)

        return call(0)[0]

    def run(nodes, dot, scope: dict) -> str:
        text = ""
        for kind, value in nodes:
            if kind == "text":
                text += value
            elif kind == "print":
                text += str(evaluate(value, dot, scope))
            elif kind == "set":
                scope[value[0]] = evaluate(value[1], dot, scope)
            elif kind == "range":
                names, source, body = value
                for index, item in enumerate(evaluate(source.strip(), dot, scope)):
                    if names:
                        scope[names[0]] = index
                    text += run(body, item, scope)
            else:
                text += next((run(body, dot, scope) for condition, body in value if evaluate(condition, dot, scope)), "")
        return text

    nodes, _ = parse(0)
    return run(nodes, None, {})


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
        assert render_go(template, ollama_messages(text, conversation)) == want


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
        got = render_go(written, ollama_messages(modelfile, conversation))
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
