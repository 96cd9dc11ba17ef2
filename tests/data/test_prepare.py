"""prepare_dataset end to end: file -> tokens with labels, the overlong policy, packing, raw text."""

import json
import logging

import pytest

from tuneforge.data.errors import DataError
from tuneforge.data.masking import IGNORE_INDEX, tokenize_conversation
from tuneforge.data.prepare import prepare_dataset

ALPACA = [
    {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    {"instruction": "Add the numbers.", "input": "2 and 2", "output": "They add up to 4."},
    {"instruction": "Write a long story. " * 20, "input": "", "output": "Once upon a time there was a fox."},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def conversation(row):
    user = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def test_alpaca_file_to_labelled_tokens(tmp_path, smollm2, caplog):
    path = write_jsonl(tmp_path / "train.jsonl", ALPACA)
    with caplog.at_level(logging.INFO, logger="tuneforge.data"):
        dataset = prepare_dataset(path, smollm2, chat_template="llama-3.1", max_seq_length=512)
    assert dataset.column_names == ["input_ids", "labels"]
    assert len(dataset) == 3
    assert smollm2.eos_token == "<|eot_id|>"  # the template was set on the tokenizer
    for row, source in zip(dataset, ALPACA):
        expected = tokenize_conversation(conversation(source), smollm2)
        assert row["input_ids"] == expected.input_ids and row["labels"] == expected.labels
        assert smollm2.decode([t for t in row["labels"] if t != IGNORE_INDEX]) == source["output"] + "<|eot_id|>"
    assert "detected 'alpaca'" in caplog.text and "data ready: 3 rows" in caplog.text


def test_the_package_exports_it():
    import tuneforge.data

    assert tuneforge.data.prepare_dataset is prepare_dataset


def test_the_models_own_template_by_default(smollm2):
    dataset = prepare_dataset(ALPACA[:2], smollm2, max_seq_length=512)
    text = smollm2.decode(dataset[0]["input_ids"])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_train_on_every_token(smollm2):
    dataset = prepare_dataset(ALPACA, smollm2, chat_template="chatml", max_seq_length=512,
                              train_on_responses_only=False)
    assert all(row["labels"] == row["input_ids"] for row in dataset)


def test_overflow_error_names_the_rows(tmp_path, smollm2):
    path = write_jsonl(tmp_path / "train.jsonl", ALPACA)
    with pytest.raises(DataError, match=r"1 of 3 rows are longer than max_seq_length=64: .*train\.jsonl row 2 \(\d+ "
                                        r"tokens\)\. Raise max_seq_length, or set overflow='truncate' or 'drop'"):
        prepare_dataset(path, smollm2, chat_template="chatml", max_seq_length=64)


def test_overflow_drop_and_truncate_are_counted(smollm2, caplog):
    with caplog.at_level(logging.WARNING, logger="tuneforge.data"):
        dropped = prepare_dataset(ALPACA, smollm2, chat_template="chatml", max_seq_length=64, overflow="drop")
    assert len(dropped) == 2 and "dropped 1 of 3 rows longer than 64" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tuneforge.data"):
        cut = prepare_dataset(ALPACA, smollm2, chat_template="chatml", max_seq_length=64, overflow="truncate")
    # The long row's reply lies beyond 64 tokens: cut, then dropped for having nothing to train.
    assert "cut 1 of 3 rows to 64 tokens" in caplog.text
    assert "dropped 1 rows whose assistant turns all lay beyond 64" in caplog.text
    assert len(cut) == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tuneforge.data"):
        kept = prepare_dataset(ALPACA, smollm2, chat_template="chatml", max_seq_length=100, overflow="truncate",
                               train_on_responses_only=False)
    assert len(kept) == 3 and max(len(ids) for ids in kept["input_ids"]) == 100


def test_packing(smollm2):
    plain = prepare_dataset(ALPACA[:2] * 3, smollm2, chat_template="chatml", max_seq_length=128)
    packed = prepare_dataset(ALPACA[:2] * 3, smollm2, chat_template="chatml", max_seq_length=128, packing=True)
    assert set(packed.column_names) == {"input_ids", "labels", "position_ids", "seq_lengths"}
    assert len(packed) < len(plain)
    assert sum(len(ids) for ids in packed["input_ids"]) == sum(len(ids) for ids in plain["input_ids"])
    assert all(len(ids) <= 128 for ids in packed["input_ids"])


def test_raw_text_rows(smollm2):
    rows = [{"text": "The quick brown fox jumps over the lazy dog. " * 10}, {"text": "Short one."}]
    dataset = prepare_dataset(rows, smollm2, max_seq_length=32, text_stride=8)
    assert all(len(ids) <= 32 for ids in dataset["input_ids"])
    assert smollm2.decode(dataset[-1]["input_ids"]).endswith("Short one.<|im_end|>")


def test_bad_settings_and_inputs(tmp_path, smollm2):
    with pytest.raises(DataError, match="overflow must be one of error, truncate, drop"):
        prepare_dataset(ALPACA, smollm2, overflow="wrap")
    with pytest.raises(DataError, match="unknown chat template 'llama-9'"):
        prepare_dataset(ALPACA, smollm2, chat_template="llama-9")
    with pytest.raises(DataError, match="the dataset is empty"):
        prepare_dataset([], smollm2)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl: the file is empty"):
        prepare_dataset(tmp_path / "empty.jsonl", smollm2)
    smollm2.chat_template = None
    with pytest.raises(DataError, match="the tokenizer has no chat template"):
        prepare_dataset(ALPACA, smollm2)
    path = write_jsonl(tmp_path / "bad.jsonl", ALPACA[:1] + [{"instruction": "x", "input": "", "output": None}])
    with pytest.raises(DataError, match=r"bad\.jsonl, row 1, field 'output': is missing or null"):
        prepare_dataset(path, smollm2, chat_template="chatml")
