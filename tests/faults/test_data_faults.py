"""Bad data files: every failure is a DataError naming the file, the row (and line) and, where
there is one, the field; nothing is skipped or rewritten silently. Before issue 15, invalid UTF-8
in JSONL was a bare UnicodeDecodeError when the row was read, a key written twice was either
"An error occurred while generating the dataset" (JSONL) or silently the last value (a JSON list),
a broken CSV was the generic datasets error, and overflow=truncate with every row cut before its
reply logged "0 rows" and ended in a StopIteration inside the Trainer."""

from __future__ import annotations

import json

import pytest

from tuneforge.data.errors import DataError
from tuneforge.data.loading import load_records

ROW = {"instruction": "Name a colour.", "output": "Blue."}


def _jsonl(*lines: bytes) -> bytes:
    return b"".join(line + b"\n" for line in lines)


GOOD = json.dumps(ROW).encode()

# (file name, bytes, (row, field) expected in the message, words expected in the message)
BAD_FILES = [
    ("latin1.jsonl", _jsonl(GOOD, b'{"instruction": "caf\xe9", "output": "x"}'),
     "row 1", "line 2, byte 21 of the line: not UTF-8"),
    ("latin1_after_blank.jsonl", _jsonl(GOOD, b"", GOOD, b'{"instruction": "\xff", "output": "x"}'),
     "row 2", "line 4, byte 18 of the line: not UTF-8"),
    ("twice.jsonl", _jsonl(GOOD, b'{"instruction": "a", "output": "b", "output": "c"}'),
     "row 1, field 'output'", "key 'output' is written twice"),
    ("twice_nested.jsonl", _jsonl(b'{"messages": [{"role": "user", "content": "a"}, '
                                  b'{"role": "assistant", "role": "user", "content": "b"}]}'),
     "row 0, field 'messages[1].role'", "key 'role' is written twice"),
    ("twice.json", b'[' + GOOD + b', {"instruction": "a", "instruction": "b", "output": "c"}]',
     "row 1, field 'instruction'", "written twice"),
    ("latin1.json", b'[' + GOOD + b',\n {"instruction": "\xe9t\xe9", "output": "c"}]', "", "line 2"),
    ("broken.jsonl", _jsonl(GOOD, GOOD, b'{"instruction": "a", "output": '), "row 2", "invalid JSON on line 3"),
    ("not_object.jsonl", _jsonl(GOOD, b'["a", "b"]'), "row 1", "line 2 is a list"),
    ("fields.csv", b"instruction,output\na,b\nc,d,e\n", "row 1", "line 3: 3 fields, the header has 2"),
    ("quote.csv", b'instruction,output\na,b\n"never closed,x\n', "row 1", "line 3: broken CSV"),
    ("latin1.csv", b"instruction,output\na,b\n\xe9t\xe9,d\n", "row 1", "line 3, byte 1 of the line: not UTF-8"),
    ("columns.csv", b"instruction,output,output\na,b,c\n", "field 'output'", "names column(s) ['output'] twice"),
]


@pytest.mark.parametrize("name, content, where, words", BAD_FILES, ids=[f[0] for f in BAD_FILES])
def test_a_bad_file_names_file_row_and_field(tmp_path, name, content, where, words):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as raised:
        load_records(path)
    message = str(raised.value)
    assert message.startswith(f"{path}{', ' + where if where else ''}:"), message
    assert words in message, message


def test_a_byte_order_mark_is_fine(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _jsonl(GOOD, GOOD))
    dataset, _ = load_records(path)
    assert dataset[1] == ROW


def test_a_bad_file_in_a_folder_is_named(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(_jsonl(GOOD))
    (tmp_path / "b.jsonl").write_bytes(_jsonl(GOOD, b'{"instruction": "\xe9", "output": "x"}'))
    with pytest.raises(DataError, match=f"{tmp_path / 'b.jsonl'}, row 1: line 2"):
        load_records(tmp_path)


def test_a_wrong_type_in_one_row_names_row_and_field(tmp_path):
    from tuneforge.data.formats import to_conversations

    path = tmp_path / "mixed.jsonl"
    path.write_bytes(_jsonl(GOOD, b'{"instruction": 5, "output": "x"}'))
    dataset, locate = load_records(path)
    with pytest.raises(DataError, match=f"{path}, row 1, field 'instruction': must be a string, got int"):
        to_conversations(dataset, locate=locate)


@pytest.fixture(scope="module")
def tokenizer():
    from tiny_chat_model import tiny_tokenizer

    return tiny_tokenizer()


def test_truncate_leaving_no_row_to_train_is_a_data_error(tmp_path, tokenizer):
    """Every reply starts after max_seq_length: before, 0 rows went to the Trainer (StopIteration)."""
    from tuneforge.data import prepare_dataset

    path = tmp_path / "long_prompts.jsonl"
    rows = [{"instruction": "word " * 60, "output": "yes"}, {"instruction": "other " * 80, "output": "no"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError) as raised:
        prepare_dataset(str(path), tokenizer, max_seq_length=16, overflow="truncate")
    message = str(raised.value)
    assert "overflow=truncate left no rows to train on" in message
    assert f"{path}, row 0: the reply starts at token" in message and "Raise model.max_seq_length (>= " in message


def test_truncate_keeps_the_rows_it_can(tmp_path, tokenizer):
    from tuneforge.data import prepare_dataset

    path = tmp_path / "mixed_lengths.jsonl"
    rows = [{"instruction": "word " * 60, "output": "yes"}, {"instruction": "hi", "output": "no"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset = prepare_dataset(str(path), tokenizer, max_seq_length=120, overflow="truncate")
    assert len(dataset) == 1
