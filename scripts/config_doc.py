"""Regenerate docs/config.md from the typed config (tuneforge/config.py)."""

import dataclasses
import typing
from pathlib import Path

from tuneforge import config

SECTIONS = [("model", config.ModelConfig), ("lora", config.LoraSection), ("data", config.DataConfig),
            ("training", config.TrainingConfig)]


def _allowed(path: str) -> str:
    if path in config.RANGES:
        return config.RANGES[path][1]
    names = {"training.optim": config.known_optimizers, "training.lr_scheduler_type": config.known_schedulers}
    if path in names:
        return ", ".join(f"`{name}`" for name in names[path]())
    return ""


def render() -> str:
    lines = ["# Config reference (`tuneforge train config.yaml`)", "",
             "Generated from `tuneforge/config.py` (`python scripts/config_doc.py`). Every key is optional; the",
             "defaults make the embedded SmolLM2 demo run. Unknown keys, wrong types and values outside the allowed",
             "range are errors naming the key, raised when the config is read (before any model loads). A key",
             "written twice in one mapping is an error too, and YAML aliases may not expand past "
             f"{config.MAX_CONFIG_VALUES:,} values.", ""]
    for section, cls in SECTIONS:
        lines += [f"## `{section}`", ""]
        if section == "lora":
            old = ", ".join(f"`{a.split('.')[1]}` is `{b.split('.')[1]}`" for a, b in config.RENAMED_KEYS.items())
            lines += ["The keys are `FastLanguageModel.get_peft_model`'s argument names, and the section is passed to it "
                      "whole.", f"The older names still load, with one log line naming the new ones: {old} (writing "
                      "both names of one key is an error).", ""]
        lines += ["| key | type | default | allowed |", "|---|---|---|---|"]
        hints = typing.get_type_hints(cls)
        defaults = cls()
        for field in dataclasses.fields(cls):
            lines.append(f"| `{field.name}` | `{config._type_name(hints[field.name]).replace(' | ', ' or ')}` | "
                         f"`{getattr(defaults, field.name)!r}` | {_allowed(f'{section}.{field.name}')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    out.write_text(render())
    print(f"wrote {out}")
