"""docs/architecture.md walks one training step: the ops it lists are the ops that run, and its
`file:line` links land on the definitions they name.

The step is the walk's: a tiny Llama loaded by `FastLanguageModel.from_pretrained(load_in_4bit=True,
use_kernels=True)` (NF4 bases; the kernels run under the Triton interpreter on the CPU),
`FastLanguageModel.get_peft_model` on the seven projections with its default offloaded
checkpointing, a padded batch made padding-free as the trainer's collator does, one forward with
labels and one backward. `tuneforge.testing.trace.record_ops` records the registry's ops as they
run; each decoder layer's calls are filed under that layer (forward, and in the backward its
recomputation followed by its backward), the rest under the head.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch

from tuneforge.kernels.registry import OPS

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"

# The sections of the doc's "ops of one step" block, in order.
LAYER_FORWARD, HEAD_FORWARD, HEAD_BACKWARD, LAYER_BACKWARD = (
    "forward, each decoder layer", "forward, head", "backward, head", "backward, each decoder layer")


def doc_ops(text: str | None = None) -> dict[str, list[str]]:
    """section -> its op lines ("  " per nesting level + name), from the fenced block of
    docs/architecture.md that starts with `# ops of one step`; `# ...` lines open sections and
    anything after `#` on an op line is a comment."""
    text = DOC.read_text() if text is None else text
    blocks = [b for b in re.findall(r"^```\w*\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
              if b.startswith("# ops of one step\n")]
    assert len(blocks) == 1, "docs/architecture.md needs one fenced block starting with '# ops of one step'"
    sections: dict[str, list[str]] = {}
    current = None
    for line in blocks[0].splitlines()[1:]:
        if line.lstrip().startswith("#"):
            current = line.lstrip("# ").strip()
            sections[current] = []
        elif line.split("#")[0].strip():
            assert current is not None, f"op line before any '# section' line: {line!r}"
            sections[current].append(line.split("#")[0].rstrip())
    return sections


def test_the_doc_block_has_the_four_sections_and_names_only_registry_ops():
    sections = doc_ops()
    assert list(sections) == [LAYER_FORWARD, HEAD_FORWARD, HEAD_BACKWARD, LAYER_BACKWARD]
    names = {op.name for op in OPS}
    for section, lines in sections.items():
        assert lines, section
        for line in lines:
            depth = (len(line) - len(line.lstrip(" "))) / 2
            assert depth == int(depth), f"{section}: indent by two spaces per level: {line!r}"
            op = line.strip().removesuffix(" backward")
            assert op in names, f"{section}: {op!r} is not an op of kernels/registry.py"


def test_the_parser_sees_a_line_removed_from_the_block():
    text = DOC.read_text()
    shortened = text.replace("rope                                  # q and k\n", "", 1)
    assert shortened != text, "the block's rope line moved: update this test"
    assert doc_ops(shortened)[LAYER_FORWARD] != doc_ops(text)[LAYER_FORWARD]


def _lines(entries: list[tuple[int, str]]) -> list[str]:
    return ["  " * depth + name for depth, name in entries]


@pytest.fixture(scope="module")
def recorded(tiny_llama_dir) -> dict[str, list[str]]:
    """label -> op lines of one traced training step (labels: "forward layer 0", ..., "forward head",
    "backward head", "backward layer 1", ...)."""
    from tuneforge.data.packing import padding_free_batch
    from tuneforge.fast_language_model import FastLanguageModel
    from tuneforge.patch.activation_checkpointing import active_mode
    from tuneforge.testing.tiny import randomize_lora_b, tiny_batch
    from tuneforge.testing.trace import record_ops

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, _ = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_4bit=True, use_kernels=True,
                                                     max_seq_length=64, dtype=torch.float32)
        model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16)  # the seven projections
        randomize_lora_b(model)
        assert model.tuneforge.kernels == ["rms_norm", "rope", "varlen", "swiglu", "fused_cross_entropy", "nf4_gemv"]
        assert model.tuneforge.lora_kernels == ["lora_mlp", "lora_qkv", "lora_linear"]
        assert active_mode(model) == "offload"
        model.train()
        ids, mask, labels = tiny_batch()
        # What the trainer's collator does with TRL's padded rows (train/trainer.py PaddingFreeBatches).
        batch = padding_free_batch({"input_ids": ids, "attention_mask": mask, "labels": labels})
        assert batch["cu_seq_lens_q"].tolist() == [0, 8, 14]
        # One step untraced first: what runs once per process (GPU kernel builds) is not a step's work.
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

        with pytest.MonkeyPatch.context() as monkeypatch:
            trace = record_ops(monkeypatch)
            phase = ["forward"]
            base = model.get_base_model()
            for index, layer in enumerate(base.model.layers):
                # The checkpoint function gets the layer's forward: called once in the forward, and
                # again in the backward when the layer is recomputed.
                def checkpointed(function, *args, _run=layer._gradient_checkpointing_func, _index=index):
                    @functools.wraps(function)
                    def layer_forward(*a, **k):
                        with trace.section(f"{phase[0]} layer {_index}"):
                            return function(*a, **k)

                    return _run(layer_forward, *args)

                monkeypatch.setattr(layer, "_gradient_checkpointing_func", checkpointed)
            hook = base.model.norm.register_forward_pre_hook(lambda *_: trace.mark("forward head"))
            try:
                loss = model(**batch).loss
                phase[0] = "backward"
                trace.mark("backward head")
                loss.backward()
            finally:
                hook.remove()
        assert torch.isfinite(loss)
        return {label: _lines(entries) for label, entries in trace.by_label().items()}
    finally:
        torch.set_num_threads(threads)


def test_one_training_step_runs_the_ops_the_doc_lists(recorded):
    doc = doc_ops()
    layers = len([label for label in recorded if label.startswith("forward layer ")])
    assert layers == 2
    assert list(recorded) == [*(f"forward layer {i}" for i in range(layers)), "forward head", "backward head",
                              *(f"backward layer {i}" for i in reversed(range(layers)))]
    # The first decoder layer first: a difference shows as one diff against the doc's block.
    assert recorded["forward layer 0"] == doc[LAYER_FORWARD]
    assert recorded["forward head"] == doc[HEAD_FORWARD]
    assert recorded["backward head"] == doc[HEAD_BACKWARD]
    # Offloaded checkpointing: a layer's backward recomputes its forward first.
    assert recorded["backward layer 0"] == doc[LAYER_FORWARD] + doc[LAYER_BACKWARD]
    for i in range(1, layers):
        assert recorded[f"forward layer {i}"] == recorded["forward layer 0"], i
        assert recorded[f"backward layer {i}"] == recorded["backward layer 0"], i


# `Name` [path:line](../src/tuneforge/path#Lline): the name in backticks right before the link.
LINK = re.compile(r"`(?P<name>[\w.]+)` \[(?P<path>[\w/.]+):(?P<line>\d+)\]\(\.\./src/tuneforge/(?P<target>[\w/.]+)"
                  r"#L(?P<anchor>\d+)\)")


def _defines(line: str, name: str) -> bool:
    return re.search(rf"^\s*(?:async\s+def|def|class)\s+{re.escape(name)}\b|^\s*{re.escape(name)}\s*(?::[^=]*)?=",
                     line) is not None


def _definition_line(lines: list[str], name: str) -> int | None:
    """1-based line defining `name` ("Class.method": the method after its class), or None."""
    start = 0
    for part in name.split("."):
        found = next((n for n in range(start, len(lines)) if _defines(lines[n], part)), None)
        if found is None:
            return None
        start = found + 1
    return start


def fix_links(text: str) -> str:
    """`text` with every source link's line number moved to where its name is defined now."""
    def moved(link):
        lines = (ROOT / "src" / "tuneforge" / link["path"]).read_text().splitlines()
        line = _definition_line(lines, link["name"]) or int(link["line"])
        return f"`{link['name']}` [{link['path']}:{line}](../src/tuneforge/{link['path']}#L{line})"

    return LINK.sub(moved, text)


def test_every_source_link_lands_on_the_definition_it_names():
    text = DOC.read_text()
    links = list(LINK.finditer(text))
    assert len(links) > 50
    all_source_links = re.findall(r"\]\(\.\./src/", text)
    assert len(all_source_links) == len(links), "a link into src/ is not written as `Name` [path:line](...#Lline)"
    wrong = []
    for link in links:
        path, name, line = link["path"], link["name"], int(link["line"])
        source = ROOT / "src" / "tuneforge" / path
        if link["target"] != path or int(link["anchor"]) != line:
            wrong.append(f"{link[0]}: the text and the target disagree")
            continue
        if not source.is_file():
            wrong.append(f"{link[0]}: no file src/tuneforge/{path}")
            continue
        lines = source.read_text().splitlines()
        *owners, last = name.split(".")
        ok = line <= len(lines) and _defines(lines[line - 1], last) and all(
            any(_defines(earlier, owner) for earlier in lines[: line - 1]) for owner in owners)
        if not ok:
            found = [n for n, text_line in enumerate(lines, 1) if _defines(text_line, last)]
            wrong.append(f"{link[0]}: line {line} does not define {name} (defined at {found or 'no line'})")
    assert not wrong, ("docs/architecture.md (`python tests/test_architecture.py --fix-links` moves the line "
                       "numbers to the definitions):\n" + "\n".join(wrong))


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--fix-links"]:
        sys.exit("usage: python tests/test_architecture.py --fix-links")
    DOC.write_text(fix_links(DOC.read_text()))
