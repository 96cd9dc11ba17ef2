"""kernels/registry.py lists every op of tuneforge.kernels, and each entry holds.

- every module of kernels/ is an op module of the table or named in SUPPORT (not both);
- every registered public function and reference exists and is callable;
- the op's test file exists and names both the public function and the reference;
- a bench case (when not None) is a case of bench/kernels.py `cases()`, and every case there is registered;
- a public callable defined in an op module is registered (function, reference or extras) or private.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import tuneforge.kernels
from tuneforge.kernels.registry import OPS, SUPPORT

ROOT = Path(__file__).resolve().parents[2]
OP_MODULES = sorted({op.module for op in OPS})


def _module(name: str):
    return importlib.import_module(f"tuneforge.kernels.{name}")


def _bench_cases() -> list[str]:
    """The case names `cases()` of bench/kernels.py yields, read from its source (no GPU needed)."""
    text = (ROOT / "bench" / "kernels.py").read_text()
    body = text[text.index("def cases():"):]
    body = body[: body.index("\ndef ", 1)]
    return re.findall(r'yield \(\s*"([^"]+)"', body)


def _mentions(text: str, name: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", text) is not None or f".{name}" in text


def test_every_kernels_module_is_an_op_module_or_support():
    found = {m.name for m in pkgutil.iter_modules(tuneforge.kernels.__path__)}
    assert not set(OP_MODULES) & set(SUPPORT), "a module is both an op module and support"
    assert found == set(OP_MODULES) | set(SUPPORT), (
        f"not in the registry: {sorted(found - set(OP_MODULES) - set(SUPPORT))}; "
        f"registered but missing: {sorted(set(OP_MODULES) | set(SUPPORT) - found)}")


def test_op_names_are_unique():
    names = [op.name for op in OPS]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("op", OPS, ids=[op.name for op in OPS])
def test_function_and_reference_exist(op):
    module = _module(op.module)
    for name in (op.function, op.reference, *op.extras):
        assert callable(getattr(module, name, None)), f"tuneforge.kernels.{op.module}.{name} is not a callable"
    assert op.reference.startswith("reference_")


@pytest.mark.parametrize("op", OPS, ids=[op.name for op in OPS])
def test_the_test_file_compares_the_function_with_its_reference(op):
    path = ROOT / "tests" / "kernels" / op.test
    assert path.is_file(), f"{op.name}: no test file {path}"
    text = path.read_text()
    for name in (op.function, op.reference):
        assert _mentions(text, name), f"{op.test} never names {name}"


@pytest.mark.parametrize("op", [op for op in OPS if op.bench], ids=[op.name for op in OPS if op.bench])
def test_the_bench_case_exists(op):
    assert op.bench in _bench_cases(), f"{op.name}: bench/kernels.py cases() has no case {op.bench!r}"


def test_every_bench_case_is_registered():
    registered = {op.bench for op in OPS}
    assert [case for case in _bench_cases() if case not in registered] == []


@pytest.mark.parametrize("name", OP_MODULES)
def test_every_public_callable_of_an_op_module_is_registered(name):
    module = _module(name)
    registered = {n for op in OPS if op.module == name for n in (op.function, op.reference, *op.extras)}
    public = []
    for attr, value in vars(module).items():
        if attr.startswith("_") or not callable(value):
            continue
        defined_in = getattr(getattr(value, "fn", value), "__module__", None)  # a @triton.jit keeps .fn
        if defined_in == module.__name__:
            public.append(attr)
    assert sorted(set(public) - registered) == [], f"tuneforge.kernels.{name}: public but not in the registry"
