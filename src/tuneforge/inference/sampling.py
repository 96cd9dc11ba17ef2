"""Next-token choice on the device: EOS blocking, temperature / top-k / top-p / min-p, greedy or sampled.

Every function takes and returns tensors of fixed shapes and never reads a value on the host,
so the whole choice can sit inside a captured CUDA graph. The filters are those of transformers'
`TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper` and `MinPLogitsWarper` (in that
order, as `generate` applies them), tested against them.

scores: [B, V] float32 (transformers upcasts the last logits to float32 before processing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. do_sample False: argmax (the other fields are unused).

    temperature: scores / temperature (1.0: unchanged).
    top_k:       keep the k best scores (0: no limit).
    top_p:       keep the smallest set of best tokens whose probability reaches top_p (1.0: all).
    min_p:       keep tokens whose probability is at least min_p x the best token's (0.0: all).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0


def block_tokens(scores: torch.Tensor, token_ids: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
    """-inf at `token_ids` ([n] long) in every row while `blocked` ([1] bool) is True (min_new_tokens)."""
    current = scores.index_select(1, token_ids)
    return scores.index_copy(1, token_ids, torch.where(blocked, float("-inf"), current))


def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    """-inf below the k-th best score of each row (ties with it are kept)."""
    k = min(k, scores.shape[-1])
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """-inf outside the nucleus: sorted ascending, a token goes when the probability mass of it and
    every worse token is <= 1 - top_p; the best token always stays."""
    ascending, order = torch.sort(scores, dim=-1)
    mass = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = mass <= 1 - top_p
    drop[..., -1] = False
    return scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def min_p_filter(scores: torch.Tensor, min_p: float) -> torch.Tensor:
    """-inf where a token's probability is below min_p x the row's best probability (the best token
    always stays: its probability is >= min_p x itself)."""
    probs = scores.softmax(dim=-1)
    return scores.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))


def warp(scores: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The sampling filters in transformers' order: temperature, top-k, top-p, min-p."""
    if sampling.temperature != 1.0:
        scores = scores / sampling.temperature
    if sampling.top_k:
        scores = top_k_filter(scores, sampling.top_k)
    if sampling.top_p < 1.0:
        scores = top_p_filter(scores, sampling.top_p)
    if sampling.min_p > 0.0:
        scores = min_p_filter(scores, sampling.min_p)
    return scores


def choose(scores: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Next token per row, [B] long.

    Sampling draws from softmax(scores) by the exponential race argmax(p / E), E ~ Exp(1): the
    same distribution as torch.multinomial, from one elementwise kernel and an argmax, with no
    host-side check of the probabilities (multinomial validates them, which syncs). Random
    numbers come from torch's default generator, so torch.manual_seed makes a run repeatable.
    """
    if not sampling.do_sample:
        return scores.argmax(dim=-1)
    probs = warp(scores, sampling).softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(1.0)
    return (probs / race).argmax(dim=-1)
