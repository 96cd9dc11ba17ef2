"""Raw text becomes windows of max_seq_length tokens; every token of the stream is trained once."""

import pytest

from tuneforge.data.errors import DataError
from tuneforge.data.masking import IGNORE_INDEX
from tuneforge.data.raw_text import RawTextDataLoader, windows


@pytest.mark.parametrize("length, size, stride", [(10, 4, 0), (10, 4, 1), (10, 4, 3), (9, 3, 2), (4, 8, 2), (8, 8, 0)])
def test_windows_cover_the_stream_once(length, size, stride):
    stream = list(range(100, 100 + length))
    inputs, labels = windows(stream, size, stride)
    assert all(len(w) <= size for w in inputs)
    # Each window is a contiguous slice, starting every size - stride tokens.
    for k, window in enumerate(inputs):
        start = k * (size - stride)
        assert window == stream[start : start + size]
    # Labels: overlap tokens are context (-100); every stream token is trained exactly once, in order.
    trained = [t for row in labels for t in row if t != IGNORE_INDEX]
    assert trained == stream
    for k, row in enumerate(labels):
        assert row[: stride if k else 0] == [IGNORE_INDEX] * (stride if k else 0)


def test_bad_window_settings():
    with pytest.raises(DataError, match="stride"):
        windows([1, 2, 3], 4, 4)
    with pytest.raises(DataError, match="max_seq_length"):
        windows([1], 0, 0)


def test_documents_are_joined_with_eos(smollm2):
    loader = RawTextDataLoader(smollm2, max_seq_length=6, stride=2)
    assert loader.add_bos is False  # SmolLM2's tokenizer puts no BOS in front of text
    data = loader.chunk(["Hello world", "", "Good morning to you all"])
    stream = (smollm2("Hello world", add_special_tokens=False)["input_ids"] + [smollm2.eos_token_id]
              + smollm2("Good morning to you all", add_special_tokens=False)["input_ids"] + [smollm2.eos_token_id])
    expected_inputs, expected_labels = windows(stream, 6, 2)
    assert data == {"input_ids": expected_inputs, "labels": expected_labels}


def test_bos_before_each_document_when_asked(smollm2):
    loader = RawTextDataLoader(smollm2, max_seq_length=64, add_bos=True)
    ids = loader.chunk(["a", "b"])["input_ids"][0]
    bos, eos = smollm2.bos_token_id, smollm2.eos_token_id
    a, b = (smollm2(x, add_special_tokens=False)["input_ids"] for x in "ab")
    assert ids == [bos] + a + [eos] + [bos] + b + [eos]


def test_load_a_folder_of_text(tmp_path, smollm2):
    (tmp_path / "one.txt").write_text("First document.")
    (tmp_path / "two.md").write_text("Second document.")
    dataset = RawTextDataLoader(smollm2, max_seq_length=128).load(tmp_path)
    assert smollm2.decode(dataset[0]["input_ids"]) == "First document.<|im_end|>Second document.<|im_end|>"
    with pytest.raises(DataError, match="no such file or folder"):
        RawTextDataLoader(smollm2).load(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="every document is empty"):
        RawTextDataLoader(smollm2).chunk(["", "  "])
