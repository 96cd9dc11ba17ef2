"""Padding-free packing: many samples in one row, and no sample sees another.

A batch of B samples of lengths n_1..n_B becomes one row of T = sum(n_i) tokens:

    input_ids    [1, T]  the samples end to end, no padding
    labels       [1, T]  the samples' labels; the first token of every sample is -100, because
                         the model shifts labels by one and that label would be predicted from the
                         previous sample's last token
    position_ids [1, T]  0..n_1-1, 0..n_2-1, ...: restarting positions mark the sample boundaries
    cu_seq_lens_q/k [B+1] int32, max_length_q/k: the boundaries for varlen (flash) attention

What keeps samples apart: flash-attention kernels read cu_seq_lens; for sdpa/eager, transformers
(masking_utils.find_packed_sequence_indices) turns restarting position_ids into a block-diagonal
causal mask -- but only when no attention_mask is passed and no KV cache exists. A model whose
config has use_cache=True builds a cache in every forward, which switches that detection off and
lets samples attend to each other; so the collator passes use_cache=False with every batch.
tests/data/test_packing.py proves it: the packed loss equals the token-weighted mean of the
samples' losses run one by one, and differs when positions do not restart.

`pack_dataset` groups tokenized samples into rows of at most max_seq_length tokens (best fit
decreasing, so rows are nearly full) and records each row's sample lengths (`seq_lengths`, the
column TRL's padding-free collator also reads).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Mapping, Sequence

import torch

from tuneforge.data.errors import DataError
from tuneforge.data.masking import IGNORE_INDEX

logger = logging.getLogger(__name__)


def position_ids_for(seq_lengths: Sequence[int]) -> list[int]:
    """[0..n_1-1, 0..n_2-1, ...] for sample lengths n_i."""
    out = []
    for length in seq_lengths:
        out.extend(range(length))
    return out


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group item indices into bins of total length <= capacity, longest items first, each into the
    fullest bin that still has room. Items longer than capacity raise DataError."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    # (room left, bin index), kept sorted so the tightest bin that fits is one bisect away.
    rooms: list[tuple[int, int]] = []
    for i in order:
        length = lengths[i]
        if length > capacity:
            raise DataError(f"a sample of {length} tokens cannot be packed into rows of {capacity}", row=i)
        k = bisect.bisect_left(rooms, (length, -1))
        if k < len(rooms):
            room, b = rooms.pop(k)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        bisect.insort(rooms, (room - length, b))
    return bins


def pack_dataset(dataset, max_seq_length: int):
    """A tokenized dataset (input_ids, labels) -> packed rows with input_ids, labels, position_ids, seq_lengths.

    Sample order inside the rows follows best-fit-decreasing; the label of each sample's first token
    becomes -100 (see the module docstring).
    """
    from datasets import Dataset

    if len(dataset) == 0:
        raise DataError("nothing to pack: the dataset is empty")
    lengths = [len(ids) for ids in dataset["input_ids"]]
    bins = best_fit_decreasing(lengths, max_seq_length)
    all_ids, all_labels = dataset["input_ids"], dataset["labels"]
    rows = {"input_ids": [], "labels": [], "position_ids": [], "seq_lengths": []}
    for members in bins:
        ids, labels, seq_lengths = [], [], []
        for i in members:
            ids += all_ids[i]
            labels += [IGNORE_INDEX] + list(all_labels[i][1:])
            seq_lengths.append(lengths[i])
        rows["input_ids"].append(ids)
        rows["labels"].append(labels)
        rows["position_ids"].append(position_ids_for(seq_lengths))
        rows["seq_lengths"].append(seq_lengths)
    filled = sum(lengths) / (len(bins) * max_seq_length)
    logger.info("packing: %d samples -> %d rows of up to %d tokens (%.1f%% full)",
                len(lengths), len(bins), max_seq_length, 100 * filled)
    return Dataset.from_dict(rows)


class PaddingFreeCollator:
    """Collate samples (or packed rows) into one padding-free row; see the module docstring.

    Each feature needs input_ids; labels default to input_ids (everything trained); a feature with
    seq_lengths (a packed row) keeps its inner boundaries. Returns tensors for model(**batch).
    """

    def __init__(self, return_flash_kwargs: bool = True):
        self.return_flash_kwargs = return_flash_kwargs

    def __call__(self, features: Sequence[Mapping]) -> dict:
        if not features:
            raise DataError("cannot collate an empty batch")
        ids, labels, seq_lengths = [], [], []
        for k, feature in enumerate(features):
            row_ids = list(feature["input_ids"])
            row_labels = list(feature.get("labels", row_ids))
            if len(row_labels) != len(row_ids):
                raise DataError(f"labels has {len(row_labels)} entries but input_ids has {len(row_ids)}", row=k)
            inner = list(feature.get("seq_lengths") or [len(row_ids)])
            if sum(inner) != len(row_ids):
                raise DataError(f"seq_lengths {inner} do not add up to {len(row_ids)} tokens", row=k)
            start = 0
            for length in inner:
                if length == 0:
                    continue
                ids += row_ids[start : start + length]
                labels += [IGNORE_INDEX] + row_labels[start + 1 : start + length]
                seq_lengths.append(length)
                start += length
        batch = {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([position_ids_for(seq_lengths)], dtype=torch.long),
            # A KV cache would switch off transformers' packed-sequence mask (module docstring).
            "use_cache": False,
        }
        if self.return_flash_kwargs:
            cu = torch.zeros(len(seq_lengths) + 1, dtype=torch.int32)
            cu[1:] = torch.cumsum(torch.tensor(seq_lengths, dtype=torch.int32), 0)
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu
            batch["max_length_q"] = batch["max_length_k"] = max(seq_lengths)
        return batch


def padding_free_batch(batch: Mapping) -> dict:
    """A collated batch -> the same samples as one padding-free row with varlen boundaries, as
    PaddingFreeCollator makes it from the unpadded samples.

    Takes what collators produce: right- or left-padded rows with an attention_mask ([B, S], pads 0),
    or one padding-free row with restarting position_ids ([1, T], TRL's packing / padding_free).
    Returns input_ids / labels / position_ids [1, T_real] plus cu_seq_lens_q/k [N+1] (int32) and
    max_length_q/k (a host int), all on the CPU: computed here, before the batch reaches the GPU,
    the boundaries cost the training step no device sync. The first label of every sample becomes
    -100 (it would be predicted from the previous sample's last token); every other label, and so
    the loss and its token count, is unchanged. A batch it does not recognise (no labels, other
    keys such as pixel values, a 3-D mask) comes back as it was.
    """
    if "input_ids" not in batch or "labels" not in batch or "inputs_embeds" in batch or "cu_seq_lens_q" in batch:
        return dict(batch)  # not a token batch, or padding-free with boundaries already (TRL's packing)
    ids, labels = batch["input_ids"], batch["labels"]
    if ids.dim() != 2 or labels.shape != ids.shape or ids.is_cuda:
        return dict(batch)
    known = {"input_ids", "labels", "attention_mask", "position_ids", "use_cache", "seq_lengths"}
    if set(batch) - known:
        return dict(batch)
    mask = batch.get("attention_mask")
    if mask is not None:
        if mask.shape != ids.shape:
            return dict(batch)
        keep = mask.bool()
        samples = [{"input_ids": ids[k][keep[k]].tolist(), "labels": labels[k][keep[k]].tolist()}
                   for k in range(ids.shape[0])]
    elif "position_ids" in batch and ids.shape[0] == 1:
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
        if not starts or starts[0] != 0:
            return dict(batch)
        lengths = [b - a for a, b in zip(starts, starts[1:] + [ids.shape[1]])]
        samples = [{"input_ids": ids[0].tolist(), "labels": labels[0].tolist(), "seq_lengths": lengths}]
    else:
        return dict(batch)
    return PaddingFreeCollator()(samples)


def pad_to_budget(batch: Mapping, longest: int, samples_multiple: int = 16) -> dict:
    """A padding-free batch (cu_seq_lens) -> the same samples in one of few fixed shapes, so that a
    captured CUDA graph (train/graphed_step.py) can replay it.

    Tokens go up to the next multiple of `longest` (the trainer's max_length) with one filler sample
    (token 0, labels -100: no loss, no gradient), the sample count up to the next multiple of
    `samples_multiple` with empty samples (repeated boundaries), and max_length_q/k become `longest`.
    The real samples' tokens, labels and positions are unchanged, so are the loss and gradients:
    each sample attends only to itself, and the filler is a sample of its own.
    Shapes: a batch of T real tokens in N samples becomes ceil(T / longest) * longest tokens and
    ceil((N + 1) / samples_multiple) * samples_multiple samples (N when no filler is needed).
    """
    cu = batch["cu_seq_lens_q"]
    ids = batch["input_ids"]
    if ids.dim() != 2 or ids.shape[0] != 1 or cu.dim() != 1:
        raise ValueError("pad_to_budget takes one padding-free row [1, T] with cu_seq_lens_q [N+1]")
    real = ids.shape[1]
    if batch["max_length_q"] > longest:
        raise ValueError(f"a sample of {batch['max_length_q']} tokens is longer than longest={longest}")
    tokens = -(-real // longest) * longest
    filler = tokens - real
    bounds = cu.tolist() + ([tokens] if filler else [])
    samples = len(bounds) - 1
    padded_samples = -(-samples // samples_multiple) * samples_multiple
    bounds += [tokens] * (padded_samples - samples)
    out = dict(batch)
    out["input_ids"] = torch.nn.functional.pad(ids, (0, filler), value=0)
    out["labels"] = torch.nn.functional.pad(batch["labels"], (0, filler), value=IGNORE_INDEX)
    out["position_ids"] = torch.cat([batch["position_ids"], torch.arange(filler, dtype=torch.long, device=ids.device)[None]], 1)
    out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = torch.tensor(bounds, dtype=torch.int32, device=cu.device)
    out["max_length_q"] = out["max_length_k"] = longest
    return out
