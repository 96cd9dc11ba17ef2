"""Write the family table, in docs/families.md and in README.md, from the results of the family tests.

    pytest tests/models/test_families.py      # writes build/family_results/<family>__<check>.json
                                             # (TUNEFORGE_FAMILY_RESULTS: another folder, for both)
    pytest tests/export/test_gguf_families.py # the same for the "GGUF export" column
    python scripts/family_table.py           # reads them, writes docs/families.md and the README's table
    python scripts/family_table.py --check   # exit 1 if either file differs from what it would write
    python scripts/family_table.py --gguf-only  # only the GGUF column (and the legend) from its results;
                                             # every other cell stays as the last full run wrote it

Which families there are and what applies to each (packing, a GGUF architecture) is the family
table's (`tuneforge.models.families`), the example models the model registry's; nothing here
repeats a family fact. The tests record their results through `recorded` (tests/models/conftest.py
and tests/export/conftest.py put scripts/ on the path, so they `import family_table`).

The README gets the same table between the marker lines `<!-- families:begin -->` and
`<!-- families:end -->` of its "Model families" section; nothing else in the README is touched.

A cell says what the last test run proved: "yes" (passed), "FAILED" (ran and failed), "no" (the
family table says it does not apply, e.g. Falcon cannot pack samples) or "?" (no result: the test
was not run). Nothing in the table is typed by hand. tests/models/test_families.py fails when the
committed tables differ from what its own run's results render; tests/export/test_gguf_families.py
does the same for the GGUF column.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

RESULTS = Path(os.environ.get("TUNEFORGE_FAMILY_RESULTS", ROOT / "build" / "family_results"))
README_BEGIN = "<!-- families:begin -->"
README_END = "<!-- families:end -->"

COLUMNS = (
    # (checks written by the tests: the first must have run, the others count where they ran;
    #  column title; the FamilySpec flag that says it applies)
    (("load_16bit",), "16-bit", None),
    # lora_step_4bit: the QLoRA step against peft, run for families whose layers tuneforge quantises.
    (("load_4bit", "lora_step_4bit"), "4-bit NF4", None),
    (("lora_step",), "LoRA step = peft", None),
    (("adapter_reload",), "adapter reload (peft)", None),
    (("generate",), "generation", None),
    (("packing",), "packing", "packing"),
)
# The GGUF column's checks (tests/export/test_gguf_families.py): an F16 GGUF's logits equal
# transformers', and a Q8_0 GGUF loads and generates. Applies where the family has a gguf_arch.
GGUF_CHECKS = ("gguf_f16", "gguf_q8_0")
GGUF_TITLE = "GGUF export"


@contextlib.contextmanager
def recorded(family: str, check: str, folder: Path = RESULTS, **details):
    """Run a check and write its outcome (pass, or the error) as `folder/<family>__<check>.json`.

    The record is a dict the check may add details to (measured differences, patches applied).
    """
    folder.mkdir(parents=True, exist_ok=True)
    record = {"family": family, "check": check, "ok": False, **details}
    try:
        yield record
        record["ok"] = True
    except BaseException as error:  # noqa: BLE001 - recorded, then re-raised
        record["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        raise
    finally:
        (folder / f"{family}__{check}.json").write_text(json.dumps(record, sort_keys=True))


def load_results(folder: Path, since: float | None = None) -> dict[tuple[str, str], dict]:
    """{(family, check): record} from `folder`; with `since`, only records written after that time.

    The GGUF checks are kept whatever their time: another test file writes them (on another
    worker, before or after the family tests), and that file checks their freshness itself.
    """
    results = {}
    for path in sorted(folder.glob("*__*.json")):
        stale = since is not None and path.stat().st_mtime < since
        if stale and path.stem.split("__", 1)[-1] not in GGUF_CHECKS:
            continue
        record = json.loads(path.read_text())
        results[(record["family"], record["check"])] = record
    return results


def _cell(records: list[dict | None], applies: bool) -> str:
    if not applies:
        return "no"
    if records[0] is None:
        return "?"
    return "yes" if all(r["ok"] for r in records if r is not None) else "FAILED"


def gguf_column(results: dict[tuple[str, str], dict]) -> dict[str, str]:
    """{family: the GGUF export cell} from the GGUF checks' results."""
    from tuneforge.models.families import all_families

    return {name: _cell([results.get((name, check)) for check in GGUF_CHECKS], bool(spec.gguf_arch))
            for name, spec in sorted(all_families().items())}


def read_column(table: str, title: str) -> dict[str, str]:
    """{family: cell} of the column `title` in a rendered table."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in table.splitlines() if line.startswith("| ")]
    index = rows[0].index(title)
    return {row[0]: row[index] for row in rows[1:]}


def render(results: dict[tuple[str, str], dict]) -> str:
    """The table (with its legend and the failures of the run) as markdown."""
    from tuneforge.models.families import all_families
    from tuneforge.models.registry import known_models

    examples: dict[str, list[str]] = {}
    for model in known_models():
        examples.setdefault(model.family, []).append(model.name.split("/")[-1])
    gguf = gguf_column(results)
    titles = ["family", "model_type", "examples", *(title for _, title, _ in COLUMNS),
              "kernels", "fused LoRA", GGUF_TITLE]
    lines = [
        "<!-- generated by scripts/family_table.py from tests/models/test_families.py results; do not edit -->",
        "",
        "| " + " | ".join(titles) + " |",
        "|" + "---|" * len(titles),
    ]
    for name, spec in sorted(all_families().items()):
        cells = [name, ", ".join(spec.model_types), ", ".join(examples.get(name, [])[:3])]
        for checks, _, flag in COLUMNS:
            cells.append(_cell([results.get((name, check)) for check in checks], getattr(spec, flag) if flag else True))
        loaded = results.get((name, "load_16bit"))
        kernels = (loaded or {}).get("kernels")
        cells.append(", ".join(kernels) if kernels else ("plain path" if loaded and loaded["ok"] else "?"))
        lora = results.get((name, "lora_step"))
        fused = (lora or {}).get("fused_lora")
        cells.append(", ".join(fused) if fused else ("peft's" if lora and lora["ok"] else "?"))
        cells.append(gguf[name])
        lines.append("| " + " | ".join(cells) + " |")
    families = all_families()
    applies = {check: flag for checks, _, flag in COLUMNS for check in checks}
    applies.update({check: "gguf_arch" for check in GGUF_CHECKS})
    failed = sorted(
        f"{family} {check}: {r.get('error', '')}" for (family, check), r in results.items()
        # A stale record of a check the table now marks "no" is not a failure of this table.
        if not r["ok"] and family in families and not (applies.get(check) and not getattr(families[family], applies[check]))
    )
    lines += [
        "",
        "yes: the test passed in the last run (tiny random model of the family, CPU, fp32, compared with "
        "transformers / peft / bitsandbytes; 4-bit: NF4 with double quantisation, and where tuneforge "
        "quantises layers that transformers leaves dense, the QLoRA step against peft too). no: not "
        "supported for this family "
        "(see its module in src/tuneforge/models/families). kernels / fused LoRA: the patches applied on "
        "that run. GGUF export: the family's tiny model exported to F16 GGUF gives, in llama.cpp "
        "(llama-cpp-python), transformers' logits within 2e-3 of their range on every prompt, and its Q8_0 GGUF "
        "loads and generates (tests/export/test_gguf_families.py).",
    ]
    if failed:
        lines += ["", "Failures in the last run:", ""] + [f"- {line}" for line in failed]
    return "\n".join(lines) + "\n"


def with_gguf_column(table: str, results: dict[tuple[str, str], dict]) -> str:
    """`table` (a rendered table) with its GGUF column and legend rendered from `results`."""
    column = gguf_column(results)
    legend = next(line for line in render({}).splitlines() if line.startswith("yes: "))
    lines, index = [], None
    for line in table.splitlines():
        if line.startswith("| "):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if index is None:
                index = cells.index(GGUF_TITLE)
            elif cells[0] in column:
                cells[index] = column[cells[0]]
            line = "| " + " | ".join(cells) + " |"
        elif line.startswith("yes: "):
            line = legend
        lines.append(line)
    return "\n".join(lines) + "\n"


def splice(readme: str, table: str, name: str = "README.md") -> str:
    """`readme` with the text between its family markers replaced by `table`."""
    begin, end = readme.find(README_BEGIN), readme.find(README_END)
    if begin < 0 or end < begin or readme.count(README_BEGIN) != 1 or readme.count(README_END) != 1:
        raise ValueError(f"{name} needs one line {README_BEGIN} and, after it, one line {README_END} "
                         "in its Model families section, where the table goes")
    return readme[: begin + len(README_BEGIN)] + "\n" + table + readme[end:]


def outputs(table: str, docs: Path, readme: Path) -> dict[Path, str]:
    """{file: the text it should have} for the docs page and the README."""
    return {docs: table, readme: splice(readme.read_text(), table, readme.name)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "families.md")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is out of date")
    parser.add_argument("--gguf-only", action="store_true",
                        help="rewrite only the GGUF column (tests/export/test_gguf_families.py results) and the legend")
    args = parser.parse_args(argv)
    results = load_results(args.results)
    if not results:
        print(f"no results in {args.results}: run pytest tests/models/test_families.py first", file=sys.stderr)
        return 1
    try:
        table = with_gguf_column(args.out.read_text(), results) if args.gguf_only else render(results)
        wanted = outputs(table, args.out, args.readme)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 1
    if args.check:
        stale = [str(path) for path, text in wanted.items() if not path.is_file() or path.read_text() != text]
        for path in stale:
            print(f"{path}: family table out of date; run python scripts/family_table.py", file=sys.stderr)
        return 1 if stale else 0
    for path, text in wanted.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"wrote {', '.join(str(path) for path in wanted)} ({len(results)} results)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
