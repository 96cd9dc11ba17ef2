"""Padding-free packing keeps samples apart: the packed loss equals the samples' losses run alone.

The model is a tiny random Llama (sdpa and eager attention). Per-sample reference: each sample run on
its own; the HF loss of a packed row is the mean over its trained tokens, so it must equal the sum
of the per-sample token losses divided by the total count of trained tokens. The negative controls
show the test can fail: with positions that do not restart, or with a KV cache switching off
transformers' packed-sequence mask, samples attend to each other and the loss moves.
"""

import pytest
import torch

from tuneforge.data.errors import DataError
from tuneforge.data.masking import IGNORE_INDEX
from tuneforge.data.packing import PaddingFreeCollator, best_fit_decreasing, pack_dataset
from tuneforge.testing import tiny_model
from tuneforge.testing.tiny import loss_one_by_one

LENGTHS = (7, 12, 5, 9)


def samples(seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for n in LENGTHS:
        ids = torch.randint(0, 317, (n,), generator=generator).tolist()
        labels = list(ids)
        labels[: n // 3] = [IGNORE_INDEX] * (n // 3)  # a masked "prompt" at the start of each sample
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_collator_layout():
    features = samples()
    batch = PaddingFreeCollator()(features)
    total = sum(LENGTHS)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, total)
    assert batch["position_ids"][0].tolist() == [p for n in LENGTHS for p in range(n)]
    assert batch["cu_seq_lens_q"].tolist() == [0, 7, 19, 24, 33] and batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == 12 and batch["use_cache"] is False
    starts = [0, 7, 19, 24]
    labels = batch["labels"][0].tolist()
    assert all(labels[s] == IGNORE_INDEX for s in starts)
    # Everything else is the samples' own labels.
    flat = [label for f in features for label in [IGNORE_INDEX] + f["labels"][1:]]
    assert labels == flat


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_equals_the_samples_run_one_by_one(attention):
    model = tiny_model("llama")
    model.config._attn_implementation = attention
    features = samples()
    batch = PaddingFreeCollator()(features)
    with torch.no_grad():
        packed = model(**batch).loss.double()
        reference = loss_one_by_one(model, features)
        assert torch.allclose(packed, reference, rtol=1e-5, atol=1e-6), (packed, reference)
        # Negative controls: samples that can see each other give another loss.
        leaky = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1])[None])
        assert not torch.allclose(model(**leaky).loss.double(), reference, rtol=1e-4)
        cached = dict(batch, use_cache=True)
        assert not torch.allclose(model(**cached).loss.double(), reference, rtol=1e-4)


def test_gradients_match_too():
    model = tiny_model("llama")
    features = samples(seed=1)
    model.zero_grad()
    model(**PaddingFreeCollator()(features)).loss.backward()
    packed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_one_by_one(model, features).float().backward()
    for got, expected in zip(packed, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_best_fit_decreasing_fills_rows():
    lengths = [5, 3, 8, 2, 7, 1, 4]
    bins = best_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 3  # 30 tokens in rows of 10: optimal here
    with pytest.raises(DataError, match="cannot be packed into rows of 4"):
        best_fit_decreasing([5], 4)


def test_pack_dataset_then_collate_is_the_same_as_collating_samples():
    from datasets import Dataset

    features = samples()
    packed = pack_dataset(Dataset.from_list(features), max_seq_length=20)
    assert set(packed.column_names) == {"input_ids", "labels", "position_ids", "seq_lengths"}
    assert all(len(row["input_ids"]) <= 20 for row in packed)
    assert sorted(n for row in packed for n in row["seq_lengths"]) == sorted(LENGTHS)
    for row in packed:
        assert row["position_ids"] == [p for n in row["seq_lengths"] for p in range(n)]
    # One packed row through the collator keeps its inner boundaries.
    model = tiny_model("llama")
    row = packed[0]
    members, start = [], 0
    for n in row["seq_lengths"]:
        members.append({"input_ids": row["input_ids"][start:start + n], "labels": row["labels"][start:start + n]})
        start += n
    with torch.no_grad():
        got = model(**PaddingFreeCollator()([row])).loss.double()
        assert torch.allclose(got, loss_one_by_one(model, members), rtol=1e-5)


def test_collator_rejects_inconsistent_rows():
    with pytest.raises(DataError, match="labels has 2 entries but input_ids has 3"):
        PaddingFreeCollator()([{"input_ids": [1, 2, 3], "labels": [1, 2]}])
    with pytest.raises(DataError, match="seq_lengths"):
        PaddingFreeCollator()([{"input_ids": [1, 2, 3], "seq_lengths": [2, 2]}])
