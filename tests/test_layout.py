"""The package's shape, checked over the source: imports flow one way, one module reads the environment.

Every `import` in src/tuneforge (at module level or inside a function: both are dependencies) may
name only modules of its own layer or a layer below it. The layers, lowest first, are LAYERS; a
module belongs to the first layer with a prefix it starts with. docs/architecture.md draws the same
table.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "tuneforge"

# (layer, module prefixes). A package's `command` module is the CLI-facing recipe of that package:
# it composes everything below and sits with the CLI at the top.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("tuneforge.switches", "tuneforge.atomic", "tuneforge.device", "tuneforge.config")),
    ("data", ("tuneforge.data", "tuneforge.chat_templates")),
    ("kernels", ("tuneforge.kernels",)),
    ("integration", ("tuneforge.integration",)),
    ("models", ("tuneforge.models",)),
    ("patch", ("tuneforge.patch",)),
    ("lora", ("tuneforge.lora",)),
    ("train", ("tuneforge.train",)),
    ("planning", ("tuneforge.planning",)),
    ("inference", ("tuneforge.inference",)),
    ("export", ("tuneforge.export",)),
    ("api", ("tuneforge.fast_language_model", "tuneforge.evaluate")),
    ("commands", ("tuneforge.train.command", "tuneforge.planning.command", "tuneforge.export.command",
                  "tuneforge.chat", "tuneforge.cli", "tuneforge")),
    ("testing", ("tuneforge.testing",)),
)


def layer_of(module: str) -> int:
    """Index in LAYERS of `module` (the longest matching prefix wins, so `tuneforge.train.command`
    is a command while `tuneforge.train.trainer` is train)."""
    best, length = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = index, len(prefix)
    if best is None:
        raise KeyError(module)
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(imported tuneforge module, line) for every import statement in `path`."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from tuneforge.x import y`: y may itself be a module of x
            names = [f"{target}.{alias.name}" if (SRC.parent / Path(*f"{target}.{alias.name}".split("."))).with_suffix(
                ".py").exists() or (SRC.parent / Path(*f"{target}.{alias.name}".split("."))).is_dir() else target
                     for alias in node.names]
        else:
            continue
        found += [(name, node.lineno) for name in names if name == "tuneforge" or name.startswith("tuneforge.")]
    return found


def upward_imports() -> list[str]:
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        module = module_name(path)
        own = layer_of(module)
        for target, line in imports_of(path):
            if target == "tuneforge" and module != "tuneforge":
                wrong.append(f"{path.relative_to(SRC.parent)}:{line}: imports the package root")
            elif layer_of(target) > own:
                wrong.append(f"{path.relative_to(SRC.parent)}:{line}: {module} ({LAYERS[own][0]}) imports "
                             f"{target} ({LAYERS[layer_of(target)][0]})")
    return wrong


def test_imports_flow_one_way():
    wrong = upward_imports()
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_every_module_has_a_layer():
    for path in SRC.rglob("*.py"):
        layer_of(module_name(path))  # raises KeyError for a module outside the table


@pytest.mark.parametrize("module, target", [
    ("tuneforge.kernels.nf4", "tuneforge.models.loader"),
    ("tuneforge.models.loader", "tuneforge.patch"),
    ("tuneforge.train.trainer", "tuneforge.train.command"),
])
def test_the_check_sees_an_upward_import(module, target):
    """The rule itself: these imports would be refused."""
    assert layer_of(target) > layer_of(module)


def test_only_switches_reads_the_environment():
    """Switches are resolved once (tuneforge.switches); nothing else reads or writes os.environ."""
    readers = []
    for path in sorted(SRC.rglob("*.py")):
        if module_name(path) == "tuneforge.switches":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "putenv") and \
                    isinstance(node.value, ast.Name) and node.value.id == "os":
                readers.append(f"{path.relative_to(SRC.parent)}:{node.lineno}")
    assert not readers, "os.environ outside tuneforge/switches.py:\n" + "\n".join(readers)
