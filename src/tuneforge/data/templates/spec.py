"""A chat format as data, and the Jinja template generated from it.

Most chat formats are "a prefix and a suffix around each role's text". `ChatTemplate` holds those
strings; `ChatTemplate.jinja()` writes the Jinja that transformers renders (`apply_chat_template`),
so the format is stated once and the template cannot drift from it. Formats that the parts cannot
say (Qwen 3's thinking blocks) carry a hand-written `custom_jinja` instead.

In the strings, `{content}` is the message text, `{system}` the system text where a format merges it
into a user turn, and `{eos_token}` the tokenizer's EOS for the few family-agnostic formats (alpaca).

Every generated template wraps what the assistant writes -- its text and the end-of-turn token,
nothing of the template around them -- in `{% generation %}` ... `{% endgeneration %}`. transformers
reports those character spans (`return_assistant_tokens_mask`), which is how `tuneforge.data.masking`
labels exactly the assistant tokens; TRL's `assistant_only_loss` reads the same tags.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

_PLACEHOLDER = re.compile(r"(\{content\}|\{system\}|\{eos_token\}|\{bos_token\})")
_VARIABLE = {"{content}": "content", "{system}": "system_message", "{eos_token}": "eos_token", "{bos_token}": "bos_token"}
_GENERATION_TAG = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")


def jinja_string(text: str) -> str:
    """`text` as a Jinja string literal (Jinja unescapes \\n, \\\\ and \\' in literals)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def jinja_expr(fmt: str) -> str:
    """'<a>{content}<b>' -> "'<a>' + content + '<b>'"; empty pieces are left out."""
    pieces = [piece for piece in _PLACEHOLDER.split(fmt) if piece]
    return " + ".join(_VARIABLE.get(piece, jinja_string(piece)) for piece in pieces) or "''"


def _emit(fmt: str) -> str:
    return "{{- " + jinja_expr(fmt) + " -}}" if fmt else ""


def strip_generation_tags(template: str) -> str:
    """The template without `{% generation %}` markers, for consumers that do not know the tag."""
    return _GENERATION_TAG.sub("", template)


def has_generation_tags(template: str | None) -> bool:
    return bool(template) and _GENERATION_TAG.search(template) is not None


def mapping_prelude(mapping: Mapping[str, str]) -> str:
    """Jinja that rebuilds `messages` from other key/role names (Unsloth's `mapping` argument).

    mapping = {"role": "from", "content": "value", "user": "human", "assistant": "gpt"} lets the
    template read ShareGPT rows directly: each message's `from`/`value` become `role`/`content` and
    the role names human/gpt become user/assistant.
    """
    role_key = mapping.get("role", "role")
    content_key = mapping.get("content", "content")
    renames = {mapping[role]: role for role in ("system", "user", "assistant") if role in mapping and mapping[role] != role}
    table = "{" + ", ".join(f"{jinja_string(k)}: {jinja_string(v)}" for k, v in renames.items()) + "}"
    return (
        "{%- set ns_mapped = namespace(turns=[]) -%}"
        "{%- for m in messages -%}"
        f"{{%- set ns_mapped.turns = ns_mapped.turns + [{{'role': {table}.get(m[{jinja_string(role_key)}], "
        f"m[{jinja_string(role_key)}]), 'content': m[{jinja_string(content_key)}]}}] -%}}"
        "{%- endfor -%}"
        "{%- set messages = ns_mapped.turns -%}"
    )


@dataclass(frozen=True)
class ChatTemplate:
    """One chat format. See the module docstring for the placeholders.

    user, assistant_prefix + assistant + assistant_suffix, system: how each role's turn is written.
    `assistant` is the part the model writes and must end with `end_of_turn`; `assistant_prefix` is
    the header before it (also the generation prompt unless `generation_prompt` says otherwise).
    When `system` is None the system text joins a user turn through `system_merge`
    ('{system}\\n\\n{content}'), the first or the last user turn (`system_into`).
    """

    name: str
    user: str
    assistant: str
    end_of_turn: str
    assistant_prefix: str = ""
    assistant_suffix: str = ""
    last_assistant_suffix: str | None = None  # replaces assistant_suffix after the final message
    system: str | None = None
    system_merge: str = "{system}\n\n{content}"
    system_into: str = "first_user"  # or "last_user"
    bos: str = ""
    default_system: str | None = None  # used when the conversation has no system turn; "" = an empty one
    trim: tuple[str, ...] = ()  # roles whose text is stripped of surrounding whitespace
    generation_prompt: str | None = None  # default: assistant_prefix
    tail: str = ""  # written at the very end unless add_generation_prompt
    instruction_part: str | None = None  # Unsloth-style markers for token matching; derived when None
    response_part: str | None = None
    aliases: tuple[str, ...] = ()
    source: str = ""  # where the format is published
    note: str = ""  # how we differ from the reference template, and why
    custom_jinja: str | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.system_into not in ("first_user", "last_user"):
            raise ValueError(f"{self.name}: system_into must be first_user or last_user")
        if not self.assistant.endswith(self.end_of_turn):
            raise ValueError(f"{self.name}: the assistant part must end with end_of_turn {self.end_of_turn!r}")
        for part in (self.user, self.assistant):
            if "{content}" not in part:
                raise ValueError(f"{self.name}: {part!r} has no {{content}}")

    @property
    def prompt(self) -> str:
        """The text after which the model starts writing (the generation prompt)."""
        return self.assistant_prefix if self.generation_prompt is None else self.generation_prompt

    @property
    def user_marker(self) -> str:
        """Unsloth's instruction_part: the text that opens a user turn."""
        if self.instruction_part is not None:
            return self.instruction_part
        return self.user.split("{content}")[0]

    @property
    def assistant_marker(self) -> str:
        """Unsloth's response_part: the text right before the assistant writes."""
        if self.response_part is not None:
            return self.response_part
        if self.assistant_prefix:
            return self.assistant_prefix
        return self.user.split("{content}")[1]

    def with_default_system(self, system_message: str | None) -> "ChatTemplate":
        from dataclasses import replace

        return replace(self, default_system=system_message)

    def jinja(self, mapping: Mapping[str, str] | None = None) -> str:
        """The Jinja chat template, with `{% generation %}` around what the assistant writes."""
        prelude = mapping_prelude(mapping) if mapping else ""
        if self.custom_jinja is not None:
            if self.default_system is not None and "{default_system}" not in self.custom_jinja:
                raise NotImplementedError(f"chat template {self.name}: system_message is not supported; put a "
                                          "system turn first in each conversation instead")
            body = self.custom_jinja
            if "{default_system}" in body:
                default = "none" if self.default_system is None else jinja_string(self.default_system)
                body = body.replace("{default_system}", default)
            return prelude + body
        return prelude + self._generated_jinja()

    def _trimmed(self, role: str, variable: str = "message['content']") -> str:
        return f"{variable} | trim" if role in self.trim else variable

    def _generated_jinja(self) -> str:
        default = "none" if self.default_system is None else jinja_string(self.default_system)
        out = [
            "{%- if messages[0]['role'] == 'system' -%}",
            "{%- set system_message = " + self._trimmed("system", "messages[0]['content']") + " -%}",
            "{%- set loop_messages = messages[1:] -%}",
            "{%- else -%}",
            "{%- set system_message = " + default + " -%}",
            "{%- set loop_messages = messages -%}",
            "{%- endif -%}",
        ]
        if self.bos:
            out.append(_emit(self.bos))
        if self.system is not None:
            out.append("{%- if system_message is not none -%}" + _emit(self.system.replace("{content}", "{system}")) + "{%- endif -%}")
        else:
            # The system text joins one user turn: find its index first (loops cannot leak variables).
            pick = "ns.target == -1" if self.system_into == "first_user" else "true"
            out.append(
                "{%- set ns = namespace(target=-1) -%}"
                "{%- for m in loop_messages -%}{%- if m['role'] == 'user' and " + pick + " -%}"
                "{%- set ns.target = loop.index0 -%}{%- endif -%}{%- endfor -%}"
            )
        out.append("{%- for message in loop_messages -%}")
        out.append("{%- if message['role'] == 'user' -%}")
        out.append("{%- set content = " + self._trimmed("user") + " -%}")
        if self.system is None:
            out.append(
                "{%- if system_message is not none and loop.index0 == ns.target -%}"
                "{%- set content = " + jinja_expr(self.system_merge) + " -%}{%- endif -%}"
            )
        out.append(_emit(self.user))
        out.append("{%- elif message['role'] == 'assistant' -%}")
        out.append("{%- set content = " + self._trimmed("assistant") + " -%}")
        out.append(_emit(self.assistant_prefix))
        out.append("{%- generation -%}" + _emit(self.assistant) + "{%- endgeneration -%}")
        if self.last_assistant_suffix is not None and self.last_assistant_suffix != self.assistant_suffix:
            out.append(
                "{%- if loop.last -%}" + _emit(self.last_assistant_suffix) + "{%- else -%}"
                + _emit(self.assistant_suffix) + "{%- endif -%}"
            )
        else:
            out.append(_emit(self.assistant_suffix))
        out.append("{%- else -%}")
        out.append(
            "{{- raise_exception('chat template " + self.name + ": role ' + message['role'] + "
            "' is not supported here (a system turn must come first; other roles are user and assistant)') -}}"
        )
        out.append("{%- endif -%}")
        out.append("{%- endfor -%}")
        if self.prompt or self.tail:
            out.append("{%- if add_generation_prompt -%}" + _emit(self.prompt) + "{%- else -%}" + _emit(self.tail) + "{%- endif -%}")
        return "".join(part for part in out if part)
