"""Data loads from every kind of source, and broken files are named down to the row."""

import json

import pytest
from datasets import Dataset, DatasetDict

from tuneforge.data.errors import DataError
from tuneforge.data.loading import load_records

ROWS = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(5)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_each_file_type(tmp_path, suffix):
    path = tmp_path / f"train{suffix}"
    reference = Dataset.from_list(ROWS)
    if suffix == ".jsonl":
        write_jsonl(path, ROWS)
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS))
    elif suffix == ".csv":
        reference.to_csv(str(path), index=False)
    else:
        reference.to_parquet(str(path))
    dataset, locate = load_records(path)
    assert dataset.to_list() == ROWS
    assert locate(3) == (str(path), 3)


def test_a_folder_of_files_remembers_which_file_a_row_came_from(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS[:2])
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "b.jsonl", ROWS[2:])
    Dataset.from_list(ROWS[:1]).to_parquet(str(tmp_path / "c.parquet"))
    (tmp_path / "notes.txt").write_text("not data")
    dataset, locate = load_records(tmp_path)
    assert dataset.to_list() == ROWS[:2] + ROWS[:1] + ROWS[2:]  # files in sorted path order
    assert locate(0) == (str(tmp_path / "a.jsonl"), 0)
    assert locate(2) == (str(tmp_path / "c.parquet"), 0)
    assert locate(4) == (str(tmp_path / "sub" / "b.jsonl"), 1)


def test_in_memory_sources():
    data = Dataset.from_list(ROWS)
    assert load_records(data)[0] is data
    splits = DatasetDict(train=data, validation=data.select([0]))
    assert len(load_records(splits, split="validation")[0]) == 1
    with pytest.raises(DataError, match=r"no split 'test'; the dataset has \['train', 'validation'\]"):
        load_records(splits, split="test")
    dataset, locate = load_records(ROWS, name="my rows")
    assert dataset.to_list() == ROWS and locate(1) == ("my rows", 1)


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file or folder"):
        load_records(tmp_path / "missing.jsonl")


def test_hub_names_fail_clearly_when_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"yahma/alpaca-cleaned: is not a local file or folder, and the Hugging Face "
                                        r"Hub is switched off"):
        load_records("yahma/alpaca-cleaned")


def test_a_broken_jsonl_line_is_named(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n" + '{"instruction": "x", "output": \n')
    with pytest.raises(DataError, match=r"train\.jsonl, row 2: invalid JSON on line 4"):
        load_records(path)


def test_a_value_of_the_wrong_type_is_named_with_its_file(tmp_path):
    from tuneforge.data.formats import to_conversations

    path = write_jsonl(tmp_path / "train.jsonl", ROWS[:2] + [{"instruction": "x", "output": 7}])
    dataset, locate = load_records(path)
    with pytest.raises(DataError, match=r"train\.jsonl, row 2, field 'output': must be a string, got int"):
        to_conversations(dataset, locate=locate)


def test_a_file_that_is_not_a_list_of_objects(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(DataError, match=r"train\.jsonl, row 1: line 2 is a list, expected a JSON object"):
        load_records(path)


def test_files_that_disagree_on_columns(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS[:1])
    write_jsonl(tmp_path / "b.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match=r"b\.jsonl: has columns \['text'\] but .*a\.jsonl has \['instruction', 'output'\]"):
        load_records(tmp_path)


def test_empty_and_unsupported_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl: the file is empty"):
        load_records(tmp_path / "empty.jsonl")
    (tmp_path / "data.xml").write_text("<a/>")
    with pytest.raises(DataError, match=r"unsupported file type '\.xml'"):
        load_records(tmp_path / "data.xml")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"folder: no \.json/\.jsonl/\.csv/\.parquet files"):
        load_records(tmp_path / "folder")
