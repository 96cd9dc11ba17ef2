"""Run an Unsloth-notebook-shaped script on tuneforge, cell by cell, with only its imports changed.

The scripts in this folder are written as an Unsloth user writes them (`from unsloth import ...`,
`from unsloth.chat_templates import ...`, `from trl import SFTTrainer, SFTConfig`), with cells
separated by `# %% <name>` lines. `switch_imports` rewrites the import lines -- the only lines a
user switching to tuneforge changes -- and refuses a script in which anything else would differ.
`run_cells` executes the cells in order in one namespace, naming the cell that fails.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).parent

# The whole switch: each Unsloth import line and what it becomes. trl's SFTTrainer / SFTConfig come
# from tuneforge: `import tuneforge` does not patch trl (README, "Unsloth's notebooks").
IMPORTS = (
    (re.compile(r"^(\s*)from unsloth\.chat_templates import (.+)$"), r"\1from tuneforge.chat_templates import \2"),
    (re.compile(r"^(\s*)from unsloth import (.+)$"), r"\1from tuneforge import \2"),
    (re.compile(r"^(\s*)from trl import (SFTTrainer|SFTConfig)((, (SFTTrainer|SFTConfig))?)$"),
     r"\1from tuneforge import \2\3"),
)


def switch_imports(source: str) -> tuple[str, list[tuple[str, str]]]:
    """(the script with its Unsloth imports switched, [(old line, new line)] for each change)."""
    lines, changed = [], []
    for line in source.splitlines():
        new = line
        for pattern, replacement in IMPORTS:
            new = pattern.sub(replacement, new)
        if new != line:
            changed.append((line, new))
        lines.append(new)
    switched = "\n".join(lines) + "\n"
    left = [line for line in switched.splitlines()
            if re.match(r"\s*(from|import)\s+unsloth\b", line) or re.match(r"\s*from trl import .*SFT", line)]
    if left:
        raise AssertionError(f"imports the switch does not rewrite: {left}")
    return switched, changed


def cells(source: str) -> list[tuple[str, str]]:
    """[(name, code)] of the `# %% name` cells, in order."""
    out: list[tuple[str, str]] = []
    for block in re.split(r"^# %%", source, flags=re.MULTILINE)[1:]:
        header, _, code = block.partition("\n")
        out.append((header.strip() or f"cell {len(out) + 1}", code))
    return out


def run_cells(source: str, filename: str, namespace: dict,
              before: dict[str, Callable[[dict], None]] | None = None,
              after: dict[str, Callable[[dict], None]] | None = None) -> list[str]:
    """Execute every cell of `source` in `namespace`; `before[name]` / `after[name]` run around the
    cell called `name` (what the test checks there). Returns the names of the cells run."""
    ran = []
    for name, code in cells(source):
        if before and name in before:
            before[name](namespace)
        try:
            exec(compile(code, f"{filename} [{name}]", "exec"), namespace)  # noqa: S102 - our own test scripts
        except Exception as error:  # noqa: BLE001 - re-raised with the cell's name
            raise AssertionError(f"{filename}: cell {name!r} failed: {type(error).__name__}: {error}\n"
                                 + traceback.format_exc()) from error
        if after and name in after:
            after[name](namespace)
        ran.append(name)
    return ran
