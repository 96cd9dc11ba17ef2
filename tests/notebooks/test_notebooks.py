"""Unsloth's notebooks on tuneforge with only the imports changed: the Alpaca, conversational and
Qwen3 flows end to end on the real SmolLM2-135M (CPU), cell by cell (runner.py).

Each script (nb_*.py) is written the way an Unsloth user writes it; the runner switches its import
lines and nothing else, then runs the cells. Checks between cells: training metrics, generation
(BatchEncoding inputs, min_p on the fast path), masking, the adapter reloaded by folder name giving
the logits of the model that saved it, the exports on disk, the offline Hub error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from runner import HERE, cells, run_cells, switch_imports

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "Below is an instruction. What is the capital of France?"


@pytest.fixture
def notebook_dir(tmp_path, monkeypatch, smollm2_dir):
    """A fresh working folder holding the scripts' small local datasets (in place of Hub downloads)."""
    rows = [json.loads(line) for line in
            (Path(__file__).parents[2] / "src/tuneforge/resources/default_instructions.jsonl").read_text().splitlines()]
    data = tmp_path / "data"
    data.mkdir()
    (data / "alpaca.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[:16]))
    conversations = []
    for k in range(12):
        first, second = rows[2 * k], rows[2 * k + 1]
        turns = [{"from": "system", "value": "You are a helpful assistant."}] if k % 3 == 0 else []
        for row in (first, second):
            question = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": row["output"]}]
        conversations.append({"conversations": turns})
    (data / "sharegpt.jsonl").write_text("".join(json.dumps(row) + "\n" for row in conversations))
    reasoning = [{"problem": f"What is {a} + {b}?", "generated_solution": f"Add {a} and {b}: the answer is {a + b}."}
                 for a, b in [(2, 3), (7, 8), (11, 4), (20, 22), (5, 9), (13, 13), (40, 2), (6, 6)]]
    (data / "reasoning.jsonl").write_text("".join(json.dumps(row) + "\n" for row in reasoning))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _source(name: str) -> str:
    return (HERE / name).read_text()


def _logits(namespace) -> torch.Tensor:
    model, tokenizer = namespace["model"], namespace["tokenizer"]
    ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
    with torch.no_grad():
        return model(input_ids=ids).logits.float().cpu()


def _reload_checks(record: dict):
    """before 'save' / after 'reload': the adapter reloaded by name gives the saving model's logits."""
    def before(namespace):
        record["saved"] = _logits(namespace)

    def after(namespace):
        again = _logits(namespace)
        record["max_abs_difference"] = float((again - record["saved"]).abs().max())
        assert torch.equal(again, record["saved"]), record["max_abs_difference"]
        for name in ("save_pretrained_merged", "save_pretrained_gguf", "push_to_hub_merged", "push_to_hub_gguf"):
            assert callable(getattr(namespace["model"], name)), name
        print(f"adapter reloaded by folder name: max |logits - saving model's logits| = "
              f"{record['max_abs_difference']}")

    return before, after


def _print_export_checks(folder: Path) -> None:
    """The export checks' numbers (export.verify writes them beside the files), for the test log."""
    report = folder / "export_report.json"
    if report.is_file():
        for check in json.loads(report.read_text())["checks"]:
            print(f"export check {check['artefact']}: passed={check['passed']} relative_diff={check['relative_diff']}")


def _trained(namespace):
    metrics = namespace["trainer_stats"].metrics
    for key in ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss"):
        assert key in metrics, key
    assert namespace["trainer_stats"].global_step == 3 and metrics["train_runtime"] > 0


def _fast_path_used(namespace):
    model = namespace["model"]
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    assert not inner.tuneforge.generate_path.startswith("transformers"), inner.tuneforge.generate_path


@pytest.mark.parametrize("script", ["nb_alpaca.py", "nb_conversational.py", "nb_qwen3.py"])
def test_only_import_lines_change(script):
    source = _source(script)
    switched, changed = switch_imports(source)
    assert changed, "the script imports nothing from unsloth"
    for old, new in changed:
        assert old.lstrip().startswith("from ") and new.lstrip().startswith("from tuneforge"), (old, new)
    assert len(source.splitlines()) == len(switched.splitlines())
    different = [(a, b) for a, b in zip(source.splitlines(), switched.splitlines()) if a != b]
    assert different == changed


def test_alpaca_notebook(notebook_dir):
    record = {}
    before_save, after_reload = _reload_checks(record)

    def answered(namespace):
        assert namespace["answer"][0].count("### Response:") == 1
        _fast_path_used(namespace)

    def merged(namespace):
        assert (notebook_dir / "model" / "model.safetensors").is_file()
        assert (notebook_dir / "model_4bit" / "model.safetensors").is_file()
        assert (notebook_dir / "model_lora" / "adapter_config.json").is_file()

    def gguf(namespace):  # beside the merged 16-bit model in the same folder, as the notebook does
        names = sorted(p.name for p in (notebook_dir / "model").glob("*.gguf"))
        assert names == ["model.F16.gguf"], names
        assert (notebook_dir / "model" / "Modelfile").read_text().startswith("FROM ./model.F16.gguf\n")
        _print_export_checks(notebook_dir / "model")

    switched, _ = switch_imports(_source("nb_alpaca.py"))
    ran = run_cells(switched, "nb_alpaca.py", {"__name__": "__notebook__"},
                    before={"save": before_save},
                    after={"train": _trained, "inference": answered, "reload": after_reload, "merged": merged,
                           "gguf": gguf})
    assert ran == [name for name, _ in cells(switched)]


def test_conversational_notebook(notebook_dir):
    from tuneforge.export.hub import HubUnavailable

    record = {}
    before_save, after_reload = _reload_checks(record)

    def formatted(namespace):
        assert namespace["example"].startswith("<|begin_of_text|><|start_header_id|>")

    def masked(namespace):
        labels = namespace["trainer"].train_dataset[5]["labels"]
        kept = [x for x in labels if x != -100]
        assert 0 < len(kept) < len(labels)
        # Only the replies are trained on: no user header survives the masking.
        assert "user<|end_header_id|>" not in namespace["masked"]
        assert "assistant<|end_header_id|>" in namespace["decoded"]

    def answered(namespace):
        assert namespace["answer"][0].count("<|start_header_id|>assistant<|end_header_id|>") == 1
        _fast_path_used(namespace)  # a BatchEncoding as input_ids, min_p sampling

    def pushed(namespace):
        error = namespace["push_error"]
        assert isinstance(error, HubUnavailable) and "Nothing was exported" in str(error)

    switched, _ = switch_imports(_source("nb_conversational.py"))
    run_cells(switched, "nb_conversational.py", {"__name__": "__notebook__"},
              before={"save": before_save},
              after={"standardize": formatted, "check masking": masked, "train": _trained, "inference": answered,
                     "reload": after_reload, "push": pushed})


def test_qwen3_notebook(notebook_dir):
    record = {}
    before_save, after_reload = _reload_checks(record)

    def mixed(namespace):
        texts = namespace["combined_dataset"]["text"]
        assert len(texts) == 12 and all(text.startswith("<|im_start|>") for text in texts)

    def masked(namespace):
        for row in namespace["trainer"].train_dataset:
            assert row["labels"][0] == -100 and any(x != -100 for x in row["labels"])

    def gguf(namespace):  # Unsloth's default method, q8_0
        assert (notebook_dir / "model" / "model.Q8_0.gguf").is_file()
        assert (notebook_dir / "model" / "Modelfile").is_file()
        _print_export_checks(notebook_dir / "model")

    switched, _ = switch_imports(_source("nb_qwen3.py"))
    run_cells(switched, "nb_qwen3.py", {"__name__": "__notebook__"},
              before={"save": before_save},
              after={"mix": mixed, "responses only": masked, "train": _trained, "reload": after_reload,
                     "gguf": gguf})
