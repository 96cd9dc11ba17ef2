"""Every supported format becomes the same conversation; every kind of bad row is named."""

import logging

import pytest
from datasets import Dataset, DatasetDict

from tuneforge.data.errors import DataError
from tuneforge.data.formats import detect_format, normalize_conversation, standardize_sharegpt, to_conversations


def convert(rows, **kwargs):
    dataset, detected = to_conversations(Dataset.from_list(rows), **kwargs)
    return dataset, detected


@pytest.mark.parametrize("rows, expected_format, expected", [
    ([{"instruction": "Add 2 and 2.", "input": "", "output": "4"}], "alpaca",
     [{"role": "user", "content": "Add 2 and 2."}, {"role": "assistant", "content": "4"}]),
    ([{"instruction": "Translate to French.", "input": "Hello", "output": "Bonjour"}], "alpaca",
     [{"role": "user", "content": "Translate to French.\n\nHello"}, {"role": "assistant", "content": "Bonjour"}]),
    ([{"instruction": "Add.", "output": "4", "system": "Be terse."}], "alpaca",
     [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Add."},
      {"role": "assistant", "content": "4"}]),
    ([{"prompt": "2+2?", "completion": "4"}], "prompt_completion",
     [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]),
    ([{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                         {"from": "gpt", "value": "A"}]}], "sharegpt",
     [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]),
    ([{"conversations": [{"from": "user", "value": "Q"}, {"from": "bot", "value": "A"},
                         {"from": "Human", "value": "Q2"}, {"from": "chatgpt", "value": "A2"}]}], "sharegpt",
     [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
      {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]),
    ([{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}], "messages",
     [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]),
])
def test_formats_become_conversations(rows, expected_format, expected, caplog):
    with caplog.at_level(logging.INFO, logger="tuneforge.data.formats"):
        dataset, detected = convert(rows)
    assert detected == expected_format
    assert f"detected {expected_format!r}" in caplog.text
    assert dataset.column_names == ["messages"]
    assert dataset[0]["messages"] == expected


@pytest.mark.parametrize("column, keys, expected_format", [
    ("messages", ("from", "value"), "sharegpt"),
    ("conversations", ("role", "content"), "messages"),
    ("conversation", ("role", "content"), "messages"),
])
def test_turns_of_either_shape_under_any_usual_column(column, keys, expected_format):
    role, content = keys
    names = {"user": "human", "assistant": "gpt"} if role == "from" else {}
    rows = [{column: [{role: names.get("user", "user"), content: "Q"}, {role: names.get("assistant", "assistant"), content: "A"}]}]
    dataset, detected = convert(rows)
    assert detected == expected_format
    assert dataset[0]["messages"] == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


def test_raw_text_format():
    dataset, detected = convert([{"text": "Once upon a time."}, {"text": "The end."}])
    assert detected == "text" and dataset["text"] == ["Once upon a time.", "The end."]


def test_openai_content_parts_are_joined():
    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "Hi"}]}]}]
    dataset, _ = convert(rows)
    assert dataset[0]["messages"][0] == {"role": "user", "content": "Hello"}


def test_field_map_and_explicit_format(caplog):
    rows = [{"question": "2+2?", "answer": "4"}]
    with caplog.at_level(logging.INFO, logger="tuneforge.data.formats"):
        dataset, detected = convert(rows, field_map={"instruction": "question", "output": "answer"})
    assert detected == "alpaca"
    assert dataset[0]["messages"][1] == {"role": "assistant", "content": "4"}
    # An explicit format wins over detection: this table has a "text" column too.
    rows = [{"text": "ignored", "prompt": "P", "completion": "C"}]
    dataset, detected = convert(rows, format="prompt_completion")
    assert detected == "prompt_completion" and dataset[0]["messages"][0]["content"] == "P"


def test_detection_failure_says_what_to_do():
    with pytest.raises(DataError, match=r"cannot tell the format from the columns \['a', 'b'\].*field_map"):
        detect_format(["a", "b"])


@pytest.mark.parametrize("rows, kwargs, message", [
    ([{"instruction": "x", "output": "4"}, {"instruction": "y"}], {}, r"row 1, field 'output': is missing or null"),
    ([{"instruction": "x", "output": "4"}, {"instruction": None, "output": "5"}], {}, r"row 1, field 'instruction': is missing or null"),
    ([{"instruction": "x", "output": 4}], {}, r"row 0, field 'output': must be a string, got int"),
    ([{"conversations": [{"from": "human", "value": "Q"}, {"from": "robot", "value": "A"}]}], {},
     r"row 0, field 'conversations\[1\]\.from': unknown role 'robot'; known roles: "),
    ([{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": None}]}], {},
     r"row 0, field 'conversations\[1\]\.value': is null"),
    ([{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}, {"messages": []}], {},
     r"row 1, field 'messages': is an empty conversation"),
    ([{"messages": [{"role": "user", "content": "Q"}]}], {}, r"row 0, field 'messages': has no assistant turn"),
    ([{"messages": [{"role": "user", "content": "Q"}, {"role": "system", "content": "S"},
                    {"role": "assistant", "content": "A"}]}], {},
     r"row 0, field 'messages\[1\]\.role': a system turn is only allowed first"),
    ([{"messages": [{"role": None, "content": "Q"}, {"role": "assistant", "content": "A"}]}], {},
     r"row 0, field 'messages\[0\]\.role': is null"),
    ([{"q": "x"}], {"field_map": {"instruction": "question"}}, r"field_map maps 'instruction' to column 'question'"),
    ([{"q": "x"}], {"field_map": {"nonsense": "q"}}, r"field_map key 'nonsense' is not a known field"),
    ([{"q": "x"}], {"format": "yaml"}, r"unknown format 'yaml'"),
    ([{"prompt": "x"}], {"format": "prompt_completion"}, r"format 'prompt_completion' needs a column 'completion'"),
])
def test_bad_rows_are_named(rows, kwargs, message):
    with pytest.raises(DataError, match=message):
        convert(rows, **kwargs)


def test_missing_key_inside_a_turn_is_named():
    with pytest.raises(DataError, match=r"field 'messages\[0\]\.content': missing \(keys present: \['role'\]\)"):
        normalize_conversation([{"role": "user"}], field="messages")


def test_empty_dataset_names_the_source():
    empty = Dataset.from_dict({"text": []})
    with pytest.raises(DataError, match=r"train\.jsonl: the dataset is empty \(0 rows\)"):
        to_conversations(empty, locate=lambda i: ("train.jsonl", i))


def test_errors_name_the_file_and_row_through_locate():
    rows = Dataset.from_list([{"instruction": "x", "output": "4"}] * 3 + [{"instruction": "y", "output": None}])
    locate = lambda i: ("a.jsonl", i) if i < 2 else ("b.jsonl", i - 2)  # noqa: E731
    with pytest.raises(DataError, match=r"^b\.jsonl, row 1, field 'output': is missing or null$"):
        to_conversations(rows, locate=locate)


def test_standardize_sharegpt_keeps_the_column_and_maps_roles():
    data = Dataset.from_list([{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}])
    out = standardize_sharegpt(data)
    assert out.column_names == ["conversations"]
    assert out[0]["conversations"] == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    splits = standardize_sharegpt(DatasetDict(train=data, test=data))
    assert splits["test"][0]["conversations"][1]["role"] == "assistant"
    # Unsloth's aliases arguments: a custom name for the assistant.
    custom = Dataset.from_list([{"conversations": [{"from": "me", "value": "Q"}, {"from": "oracle", "value": "A"}]}])
    out = standardize_sharegpt(custom, aliases_for_user=["me"], aliases_for_assistant=["oracle"])
    assert [t["role"] for t in out[0]["conversations"]] == ["user", "assistant"]
    with pytest.raises(DataError, match=r"row 0, field 'conversations\[0\]\.from': unknown role 'me'"):
        standardize_sharegpt(custom)
