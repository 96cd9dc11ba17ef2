"""An Ollama `Modelfile` next to a GGUF: FROM, TEMPLATE in Ollama's Go syntax, stop tokens, parameters.

The TEMPLATE is generated from the chat format's pieces in `tuneforge.data.templates` (the same
table the training data is rendered with), so what Ollama sends the model is what it was trained
on. The format is the table entry whose Jinja the tokenizer carries, else the entry that renders
a probe conversation exactly as the tokenizer's own template does. The default system prompt a template inserts
(SmolLM2's, Qwen's) becomes the Modelfile's SYSTEM line: Ollama then passes it as the first
message when a conversation has none, as the Jinja template does. An empty default system turn
(Llama 3.1's, which is only its date header) cannot travel as SYSTEM (Ollama drops an empty one),
so the TEMPLATE writes it itself when the first message is not a system message.
`{eos_token}` / `{bos_token}` in a format (Alpaca's end of turn) become the tokenizer's own tokens.
A format without a system turn (Gemma, Mistral) gets a system message merged into the first or the
last user turn, as its Jinja does (a Go variable carries it there).

BOS is not written into the TEMPLATE: Ollama tokenises with the GGUF's add_bos_token flag.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

log = logging.getLogger(__name__)

_ROLES = ("system", "user", "assistant")


_PROBE = [
    {"role": "system", "content": "S0"},
    {"role": "user", "content": "U1"},
    {"role": "assistant", "content": "A1"},
    {"role": "user", "content": "U2"},
]


def chat_format_for(tokenizer):
    """The `ChatTemplate` whose rendering equals the tokenizer's own template, or None.

    Compared by output on a probe conversation (with a system turn, so a template's default
    system prompt does not hide the match), not by Jinja source: SmolLM2's template builds its
    markers out of the role name, so no marker appears literally in it.
    """
    from tuneforge.data.templates import template_for_tokenizer
    from tuneforge.data.templates.table import CHAT_TEMPLATES

    exact = template_for_tokenizer(tokenizer)
    if exact is not None:
        return exact
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        return None
    own = _render(tokenizer, None)
    if own is None:
        return None
    for template in CHAT_TEMPLATES:
        if template.custom_jinja is None and _render(tokenizer, template.jinja()) == own:
            return template
    return None


def _render(tokenizer, chat_template: str | None) -> str | None:
    try:
        return tokenizer.apply_chat_template(_PROBE, chat_template=chat_template, add_generation_prompt=True,
                                             tokenize=False)
    except Exception as error:  # a template may reject the probe (a role it does not know)
        log.debug("chat template rejected the probe conversation: %s", error)
        return None


def default_system_prompt(tokenizer, template) -> str | None:
    """The system text the tokenizer's template adds to a conversation that has none."""
    if template.system is None:
        return template.default_system or None
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False)
    before, after = template.system.split("{content}")
    match = re.search(re.escape(before) + "(.*?)" + re.escape(after), rendered.split("\x00")[0], re.S)
    return match.group(1) if match else None


def with_special_tokens(template, tokenizer):
    """`template` with `{eos_token}` / `{bos_token}` replaced by the tokenizer's tokens."""
    from dataclasses import fields, replace

    tokens = {"{eos_token}": tokenizer.eos_token or "", "{bos_token}": tokenizer.bos_token or ""}
    changes = {}
    for item in fields(template):
        value = getattr(template, item.name)
        if isinstance(value, str) and item.name != "custom_jinja" and any(key in value for key in tokens):
            for key, token in tokens.items():
                value = value.replace(key, token)
            changes[item.name] = value
    return replace(template, **changes) if changes else template


def _go(piece: str) -> str:
    """A table piece -> Go template text: {content} is the message, other placeholders literal."""
    if "{{" in piece or "}}" in piece:
        raise ValueError(f"chat template piece {piece!r} contains '{{{{' / '}}}}', which Go templates cannot hold")
    return piece.replace("{content}", "{{ .Content }}")


def go_template(template, empty_default_system: bool = False) -> str:
    """The Ollama TEMPLATE for a table `ChatTemplate` (Ollama's `.Messages` form).

    empty_default_system: the format writes an empty system turn when the conversation has none.
    A format without a system turn (Gemma, Mistral) merges a system message into the first or the
    last user turn (`system_into`, `system_merge`), as its Jinja does: the TEMPLATE keeps the system
    text in `$system` and writes it into that user turn.
    """
    assistant = _go(template.assistant_prefix + template.assistant + template.assistant_suffix)
    if template.trim:
        log.info("chat format %s strips whitespace around %s text; the Ollama template sends it as is",
                 template.name, ", ".join(template.trim))
    opening, messages = "", "{{ range .Messages }}"
    if template.system is not None:
        system = _go(template.system)
        user = _go(template.user)
        if empty_default_system:
            opening = ('{{ if ne (index .Messages 0).Role "system" }}'
                       f'{template.system.replace("{content}", "")}{{{{ end }}}}')
    else:
        before, after = template.system_merge.split("{system}")
        between, after = after.split("{content}")
        merged = (f"{_go(before)}{{{{ $system }}}}{_go(between)}{{{{ .Content }}}}{_go(after)}")
        if template.system_into == "first_user":
            # The first user turn after the system message takes it (then $system is spent).
            condition, spent = "$system", '{{ $system = "" }}'
        else:
            # The last message, a user turn when Ollama asks for a reply, takes it.
            condition, spent = "and $system (eq (len (slice $.Messages $i)) 1)", ""
            messages = "{{ range $i, $_ := .Messages }}"
        content = f"{{{{ if {condition} }}}}{merged}{spent}{{{{ else }}}}{{{{ .Content }}}}{{{{ end }}}}"
        user = _go(template.user).replace("{{ .Content }}", content)
        system = "{{ $system = .Content }}"
        opening = '{{ $system := "" }}'
    # No `{{-` trim markers: they would also eat the newline that ends a turn's text.
    return (
        f"{opening}"
        f"{messages}"
        f'{{{{ if eq .Role "system" }}}}{system}'
        f'{{{{ else if eq .Role "user" }}}}{user}'
        f'{{{{ else if eq .Role "assistant" }}}}{assistant}'
        "{{ end }}"
        "{{ end }}"
        f"{_go(template.prompt)}"
    )


# --- Go text/template, the subset Ollama TEMPLATEs written here use -----------------------------

_GO_FUNCTIONS = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "and": lambda a, b: a and b,
                 "len": len, "slice": lambda x, i: x[i:], "index": lambda x, i: x[i]}
_GO_FIELDS = {"Role": "role", "Content": "content"}


def render_go_template(template: str, messages: list[dict], system: str | None = None) -> str:
    """What Ollama renders from `template` for `messages` (Go text/template semantics).

    system: the Modelfile's SYSTEM, which Ollama sends as the first message when there is none.
    The subset: `range` (also `range $i, $_ := ...`), `if` / `else if` / `else`, variables
    (`$x := v`, `$x = v`), the functions eq, ne, and, len, slice, index, the fields .Role /
    .Content of a message and .Messages / .System of `$`, string and integer literals, and `{{-` /
    `-}}` trimming. Anything else raises ValueError, so a check of a template never passes on a
    construct it did not understand.
    """
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}, *messages]
    root = {"Messages": messages, "System": system or ""}
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
                    if position >= len(tokens):
                        raise ValueError("Go template: an if without {{ end }}")
                    branches.append((condition, body))
                    action = tokens[position][1]
                    if action == "end":
                        break
                    condition = action[len("else if "):] if action.startswith("else if ") else "true"
                nodes.append(("if", branches))
            elif re.fullmatch(r"\$\w+ :?= .+", value):
                name, _, expression = value.partition(" ")
                nodes.append(("set", (name, expression.split("=", 1)[1].strip())))
            else:
                nodes.append(("print", value))
            position += 1
        return nodes, position

    def evaluate(expression: str, dot, scope: dict):
        words = re.findall(r'"[^"]*"|\(|\)(?:\.\w+)?|[^\s()]+', expression)

        def field(value, name: str):
            if value is root and name in root:
                return root[name]
            if value is not root and isinstance(value, dict) and name in _GO_FIELDS:
                return value[_GO_FIELDS[name]]
            raise ValueError(f"Go template: unsupported field .{name} in {{{{ {expression} }}}}")

        def term(index: int):
            word = words[index]
            if word == "(":
                value, index = call(index + 1)
                if index >= len(words) or not words[index].startswith(")"):
                    raise ValueError(f"Go template: unbalanced ( in {{{{ {expression} }}}}")
                name = words[index][2:]
                return (field(value, name) if name else value), index + 1
            if word.startswith('"'):
                return word[1:-1], index + 1
            if word.isdigit():
                return int(word), index + 1
            if word == "true":
                return True, index + 1
            head, *names = word.split(".")
            if head == "":
                value = dot
            elif head == "$":
                value = root
            elif head in scope:
                value = scope[head]
            else:
                raise ValueError(f"Go template: unsupported term {word!r} in {{{{ {expression} }}}}")
            for name in names:
                value = field(value, name)
            return value, index + 1

        def call(index: int):
            if words[index] in _GO_FUNCTIONS:
                function, arguments, index = _GO_FUNCTIONS[words[index]], [], index + 1
                while index < len(words) and not words[index].startswith(")"):
                    value, index = term(index)
                    arguments.append(value)
                return function(*arguments), index
            return term(index)

        value, end = call(0)
        if end != len(words):
            raise ValueError(f"Go template: unsupported action {{{{ {expression} }}}}")
        return value

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
                text += next((run(body, dot, scope) for condition, body in value
                              if evaluate(condition, dot, scope)), "")
        return text

    nodes, position = parse(0)
    if position < len(tokens):
        raise ValueError(f"Go template: {{{{ {tokens[position][1]} }}}} without a block")
    return run(nodes, root, {})


def _quote(text: str) -> str:
    if '"""' in text:
        raise ValueError(f"cannot write {text!r} into a Modelfile: it contains triple quotes")
    return f'"""{text}"""'


def stop_tokens(template) -> list[str]:
    """End of turn, plus the marker that opens the next user turn (in case the model skips EOT)."""
    stops = [template.end_of_turn]
    opener = template.user.split("{content}")[0].strip()
    if opener and opener not in stops:
        stops.append(opener)
    return stops


def gguf_context_length(gguf_path: Path) -> int | None:
    """The context length the GGUF declares (`<arch>.context_length`), or None if unreadable."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(gguf_path))
        arch = reader.fields["general.architecture"].contents()
        return int(reader.fields[f"{arch}.context_length"].contents())
    except Exception as error:  # not written yet, or not a GGUF: the caller's num_ctx stands
        log.debug("no context length read from %s: %s", gguf_path, error)
        return None


def write_modelfile(gguf_path: str | Path, tokenizer, generation_config=None, num_ctx: int = 4096,
                    path: str | Path | None = None) -> Path:
    """Write `Modelfile` beside `gguf_path` (FROM ./<file>); returns its path.

    num_ctx is capped at the GGUF's context length: a model whose sliding window llama.cpp cannot
    run declares the window there, and agrees with transformers only within it.
    """
    gguf_path = Path(gguf_path)
    context = gguf_context_length(gguf_path)
    if context is not None and context < num_ctx:
        log.info("Modelfile num_ctx %d -> %d, the context length %s declares", num_ctx, context, gguf_path.name)
        num_ctx = context
    path = Path(path) if path is not None else gguf_path.parent / "Modelfile"
    lines = [f"FROM ./{gguf_path.name}", ""]
    template = chat_format_for(tokenizer)
    if template is None:
        # Ollama falls back to the GGUF's tokenizer.chat_template when the Modelfile has no TEMPLATE.
        log.warning("no Ollama TEMPLATE for this tokenizer's chat template; Ollama will read the GGUF's own")
    else:
        template = with_special_tokens(template, tokenizer)
        system = default_system_prompt(tokenizer, template)
        lines += [f"TEMPLATE {_quote(go_template(template, empty_default_system=system == ''))}", ""]
        if system:
            lines += [f"SYSTEM {_quote(system)}", ""]
        lines += [f'PARAMETER stop "{stop}"' for stop in stop_tokens(template)]
    temperature = getattr(generation_config, "temperature", None) if generation_config is not None else None
    top_p = getattr(generation_config, "top_p", None) if generation_config is not None else None
    lines += [
        f"PARAMETER temperature {temperature if temperature is not None else 0.7}",
        f"PARAMETER top_p {top_p if top_p is not None else 0.9}",
        f"PARAMETER num_ctx {num_ctx}",
    ]
    path.write_text("\n".join(lines) + "\n")
    log.info("wrote %s (%s)", path, f"chat format {template.name}" if template else "no TEMPLATE")
    return path
