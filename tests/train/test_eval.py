"""Evaluation: eval loss every N steps during training (equal to transformers' loss on the same
batches), early stopping, the best checkpoint kept and restored; `tuneforge eval`'s loss /
perplexity / exact match against plain transformers; the held-out split of the shipped data."""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
from safetensors.torch import load_file
from tiny_chat_model import save_tiny_chat_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneforge.config import DEFAULT_HELDOUT, config_from_dict
from tuneforge.train.callbacks import read_log
from tuneforge.evaluate import answer_loss, normalise_answer
from tuneforge.data.sources import HELDOUT_ROWS, build_datasets, default_dataset_path, default_rows
from tuneforge.train.command import train


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("eval") / "model")


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_config(model_dir, **sections):
    values = {
        "model": {"name": str(model_dir), "load_in_4bit": False, "max_seq_length": 256, "use_kernels": False},
        "lora": {"r": 4, "alpha": 8, "gradient_checkpointing": False},
    }
    for key, extra in sections.items():
        values[key] = {**values.get(key, {}), **extra}
    return config_from_dict(values)


# --- during training ---------------------------------------------------------------------------


def test_eval_loss_early_stopping_and_best_checkpoint(model_dir, tmp_path):
    output = tmp_path / "run"
    patience, every = 2, 2
    config = _tiny_config(model_dir, data={"eval_fraction": 0.1}, training={
        "output_dir": str(output), "max_steps": 60, "save_steps": every, "eval_steps": every,
        "early_stopping_patience": patience, "load_best_model_at_end": True, "learning_rate": 0.05,
        "warmup_steps": 0, "per_device_train_batch_size": 2, "optim": "adamw_torch", "report_to": "none"})
    summary = train(config)

    evals = [(int(row["step"]), row["eval_loss"]) for row in read_log(output) if "eval_loss" in row]
    steps = [step for step, _ in evals]
    assert steps == list(range(every, summary["steps"] + 1, every)), "an eval every eval_steps"
    # Early stopping: the run ended `patience` evaluations after the best, before max_steps.
    best_step, best_loss = min(evals, key=lambda pair: pair[1])
    assert summary["steps"] < 60 and summary["steps"] == best_step + patience * every
    assert summary["best_eval_loss"] == pytest.approx(best_loss, abs=1e-12)
    assert summary["best_checkpoint"] == str(output / f"checkpoint-{best_step}")
    # The saved adapter is the best checkpoint's, not the last step's.
    final = load_file(output / "adapter" / "adapter_model.safetensors")
    best = load_file(output / f"checkpoint-{best_step}" / "adapter_model.safetensors")
    assert final.keys() == best.keys() and all(torch.equal(final[k], best[k]) for k in final)
    last = load_file(output / f"checkpoint-{summary['steps']}" / "adapter_model.safetensors")
    assert any(not torch.equal(final[k], last[k]) for k in final)

    # The eval loss at the best step is transformers' loss on the same eval rows in batches of 2
    # (the Trainer averages batch losses weighted by batch size), through plain peft.
    tokenizer = AutoTokenizer.from_pretrained(output / "adapter")
    _, eval_rows = build_datasets(config, tokenizer, None)
    reference = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir),
                                               output / f"checkpoint-{best_step}").eval()
    losses = []
    with torch.no_grad():
        for start in range(0, len(eval_rows), 2):
            batch = eval_rows[start:start + 2]
            width = max(len(ids) for ids in batch["input_ids"])
            pad = [width - len(ids) for ids in batch["input_ids"]]
            ids = torch.tensor([x + [tokenizer.pad_token_id] * p for x, p in zip(batch["input_ids"], pad)])
            labels = torch.tensor([x + [-100] * p for x, p in zip(batch["labels"], pad)])
            mask = torch.tensor([[1] * len(x) + [0] * p for x, p in zip(batch["input_ids"], pad)])
            loss = reference(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
            losses += [loss] * len(pad)
    assert best_loss == pytest.approx(sum(losses) / len(losses), rel=1e-5)


@pytest.mark.parametrize("training, data, message", [
    ({"eval_steps": 5}, {}, "training.eval_steps' needs an evaluation split: set data.eval_fraction"),
    ({"early_stopping_patience": 2}, {"eval_fraction": 0.1}, "needs evaluations during training: set training.eval_steps"),
    ({"load_best_model_at_end": True, "eval_steps": 4, "save_steps": 6}, {"eval_fraction": 0.1},
     r"save_steps to a multiple of training.eval_steps \(4\), got 6"),
    ({"report_to": ["tensorbored"]}, {}, "training.report_to' lists 'tensorbored'"),
    ({"save_total_limit": -1}, {}, "training.save_total_limit' must be >= 0"),
])
def test_evaluation_keys_that_do_not_fit_together_are_config_errors(training, data, message):
    from tuneforge.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        config_from_dict({"training": training, "data": data})


# --- tuneforge eval ------------------------------------------------------------------------------


@pytest.mark.parametrize("a, b, same", [
    ("The capital of Denmark is Copenhagen.", "the capital of denmark is  copenhagen", True),
    ("  five\n", "Five", True),
    ("-16", "16", False),
    ("1,000", "1000", False),
    ("Paris", "Paris is the capital", False),
    ("“ﬁve”", "five", False),  # NFKC folds the ligature but typographic quotes are not stripped
    ("ﬁve", "five", True),
])
def test_normalise_answer(a, b, same):
    assert (normalise_answer(a) == normalise_answer(b)) is same


def _rows(n=5):
    return default_rows("heldout")[:n]


def test_answer_loss_is_the_token_weighted_loss_of_plain_transformers(model_dir):
    from tuneforge.data import prepare_dataset

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = prepare_dataset(_rows(), tokenizer, max_seq_length=512)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    loss, tokens = answer_loss(model, dataset, tokenizer.pad_token_id, batch_size=2)  # padded batches
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in zip(dataset["input_ids"], dataset["labels"]):
            n = sum(label != -100 for label in labels[1:])
            total += model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item() * n
            count += n
    assert tokens == count and loss == pytest.approx(total / count, rel=1e-5)


def test_tuneforge_eval_scores_loss_and_exact_match_like_plain_transformers(model_dir, tmp_path, capsys):
    from tuneforge.cli import main

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = _rows(3)

    def greedy(row):  # one prompt at a time, no padding: the reference
        user = f"{row['instruction']}\n\n{row['input']}" if row["input"] else row["instruction"]
        ids = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    answers = [greedy(row) for row in rows]
    # Row 0's reference is the model's answer written differently, row 1's is wrong, row 2's exact.
    rows[0]["output"] = "  " + answers[0].upper() + ". "
    rows[1]["output"] = answers[1] + " and more"
    rows[2]["output"] = answers[2]
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))

    out = tmp_path / "scores.json"
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--no-4bit", "--max-new-tokens", "8",
                 "--batch-size", "3", "--json", str(out)]) == 0
    line = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert [a["answer"] for a in report["answers"]] == answers  # left-padded batch == one by one
    assert [a["match"] for a in report["answers"]] == [True, False, True]
    assert report["exact_match"] == pytest.approx(2 / 3) and "exact match 2/3 (66.7%)" in line
    from tuneforge.data import prepare_dataset

    loss, tokens = answer_loss(model, prepare_dataset(str(data), tokenizer, max_seq_length=512),
                               tokenizer.pad_token_id, batch_size=1)
    assert report["answer_tokens"] == tokens and report["loss"] == pytest.approx(loss, rel=1e-5)
    # The report's perplexity is exp of the report's own loss; that loss (left-padded batch of 3)
    # equals the one-by-one reference to fp32 summation order, which exp then scales (~1e-7).
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]), rel=1e-9)
    assert report["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


# --- the shipped data's held-out split -----------------------------------------------------------


def test_default_data_holds_out_its_last_rows_for_eval(model_dir):
    from tuneforge.data import prepare_dataset

    all_rows = [json.loads(line) for line in default_dataset_path().read_text().splitlines() if line.strip()]
    train_rows, heldout = default_rows("train"), default_rows("heldout")
    assert train_rows + heldout == all_rows and len(heldout) == HELDOUT_ROWS
    prompts = {(row["instruction"], row["input"]) for row in train_rows}
    assert not any((row["instruction"], row["input"]) in prompts for row in heldout)
    # What the default run trains on and what `tuneforge eval` scores by default.
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_set, _ = build_datasets(_tiny_config(model_dir), tokenizer, None)
    assert len(train_set) == len(all_rows) - HELDOUT_ROWS
    from tuneforge.cli import build_parser

    assert build_parser().parse_args(["eval", "--model", "x"]).data == DEFAULT_HELDOUT
    assert len(prepare_dataset(__import__("tuneforge.data.sources", fromlist=["x"]).dataset_source(DEFAULT_HELDOUT),
                               tokenizer, max_seq_length=512)) == HELDOUT_ROWS
