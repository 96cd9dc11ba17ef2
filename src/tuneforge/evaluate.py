"""`tuneforge eval`: did the fine-tune help? Loss, perplexity and exact-match accuracy on held-out
prompt/answer pairs.

    tuneforge eval --model outputs/default                      # the shipped set's held-out rows
    tuneforge eval --model tuneforge/smollm2-135m-instruct      # the same rows, base model: "before"
    tuneforge eval --model OUT --data test.jsonl --json scores.json

Loss: mean negative log-likelihood per answer token (the tokens training puts labels on: the
assistant's text and its end-of-turn token, through the same `prepare_dataset` and chat template),
summed over all rows and divided by their token count; perplexity = exp(loss).
Exact match: the greedy answer to each prompt (everything before the last assistant turn), and the
reference answer, both normalised (`normalise_answer`), are equal.
"""

from __future__ import annotations

import json
import logging
import math
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tuneforge.config import DEFAULT_HELDOUT

logger = logging.getLogger(__name__)


@dataclass
class EvalReport:
    """What `evaluate` measured. answers: one {"prompt", "expected", "answer", "match"} per row."""

    model: str
    data: str
    rows: int
    answer_tokens: int
    loss: float
    perplexity: float
    exact_match: float
    answers: list[dict] = field(default_factory=list)

    def line(self) -> str:
        matched = sum(a["match"] for a in self.answers)
        return (f"{self.model} on {self.data}: {self.rows} rows, loss {self.loss:.4f} "
                f"(perplexity {self.perplexity:.2f}) over {self.answer_tokens} answer tokens, "
                f"exact match {matched}/{self.rows} ({100 * self.exact_match:.1f}%)")


_PUNCTUATION_AROUND = ".,;:!?\"'`()[] "


def normalise_answer(text: str) -> str:
    """Case, Unicode form, runs of whitespace and punctuation around the answer do not count:
    "The capital is Paris." == "the capital is  paris"; "-16" stays "-16"; "1,000" stays."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = re.sub(r"\s+", " ", text)
    return text.strip(_PUNCTUATION_AROUND)


def split_prompts(conversations) -> list[tuple[list[dict], str]]:
    """[(prompt messages, expected answer)]: the last assistant turn is the answer."""
    pairs = []
    for messages in conversations:
        last = max(i for i, turn in enumerate(messages) if turn["role"] == "assistant")
        pairs.append((list(messages[:last]), messages[last]["content"]))
    return pairs


@torch.no_grad()
def answer_loss(model, dataset, pad_token_id: int, batch_size: int = 8) -> tuple[float, int]:
    """(sum of answer-token NLL / answer tokens, answer tokens) for a dataset of input_ids/labels.

    Rows are right-padded into batches; padding has label -100 and is masked from attention, so a
    row's loss does not depend on its batch.
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    rows = list(zip(dataset["input_ids"], dataset["labels"]))
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (row_ids, row_labels) in enumerate(chunk):
            ids[row, :len(row_ids)] = torch.tensor(row_ids)
            labels[row, :len(row_labels)] = torch.tensor(row_labels)
            mask[row, :len(row_ids)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        # Token t predicts token t + 1.
        targets = labels[:, 1:].to(device)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100,
                                                reduction="sum")
        total += nll.item()
        count += int((targets != -100).sum())
    if count == 0:
        raise ValueError("no answer tokens to score: every row's labels are -100")
    return total / count, count


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 64,
                     batch_size: int = 8) -> list[str]:
    """Greedy answers to each prompt (chat template with the generation header), left-padded batches."""
    device = next(model.parameters()).device
    answers = []
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last column: pad on the left
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
                     for p in prompts[start:start + batch_size]]
            batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
            output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
            new = output[:, batch["input_ids"].shape[1]:]
            answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
    return answers


def evaluate(model_name: str, data=DEFAULT_HELDOUT, *, max_new_tokens: int = 64, batch_size: int = 8,
             load_in_4bit: bool = True, format: str = "auto", field_map=None) -> EvalReport:
    """Score `model_name` (run folder, adapter folder, model folder or shipped name) on `data`
    (a file, folder or shipped name, Alpaca / ShareGPT / messages rows)."""
    from tuneforge.fast_language_model import load_for_inference
    from tuneforge.data import load_records, prepare_dataset, to_conversations
    from tuneforge.data.sources import dataset_source

    model, tokenizer = load_for_inference(model_name, load_in_4bit=load_in_4bit)
    source = dataset_source(str(data))
    records, locate = load_records(source)
    conversations, _ = to_conversations(records, format, field_map, locate=locate)
    pairs = split_prompts(conversations["messages"])
    # No length limit: an evaluation scores every row whole.
    dataset = prepare_dataset(source, tokenizer, format=format, field_map=field_map,
                              max_seq_length=2**31 - 1, overflow="error")
    loss, tokens = answer_loss(model, dataset, tokenizer.pad_token_id, batch_size)
    answers = generate_answers(model, tokenizer, [prompt for prompt, _ in pairs], max_new_tokens, batch_size)
    scored = [
        {"prompt": prompt[-1]["content"], "expected": expected, "answer": answer,
         "match": normalise_answer(answer) == normalise_answer(expected)}
        for (prompt, expected), answer in zip(pairs, answers)
    ]
    return EvalReport(
        model=str(model_name), data=str(data), rows=len(pairs), answer_tokens=tokens, loss=loss,
        perplexity=math.exp(loss), exact_match=sum(s["match"] for s in scored) / len(scored), answers=scored,
    )


def write_report(report: EvalReport, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(report), indent=2, ensure_ascii=False))
    return path
