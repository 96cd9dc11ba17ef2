"""Regenerate docs/config.md from the typed config (tuneforge/config.py)."""

import dataclasses
import typing
from pathlib import Path

from tuneforge import config

SECTIONS = [("model", config.ModelConfig), ("lora", config.LoraConfig), ("data", config.DataConfig),
            ("training", config.TrainingConfig)]


def render() -> str:
    lines = ["# Config reference (`tuneforge train config.yaml`)", "",
             "Generated from `tuneforge/config.py` (`python scripts/config_doc.py`). Every key is optional; the",
             "defaults make the embedded SmolLM2 demo run. Unknown keys and wrong types are errors naming the key.", ""]
    for section, cls in SECTIONS:
        lines += [f"## `{section}`", "", "| key | type | default |", "|---|---|---|"]
        hints = typing.get_type_hints(cls)
        defaults = cls()
        for field in dataclasses.fields(cls):
            lines.append(f"| `{field.name}` | `{config._type_name(hints[field.name]).replace(' | ', ' or ')}` | "
                         f"`{getattr(defaults, field.name)!r}` |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    out.write_text(render())
    print(f"wrote {out}")
