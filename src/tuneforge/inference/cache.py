"""A static KV cache and the attention masks that go with it, for decoding in a CUDA graph.

Every layer's keys and values live in one preallocated tensor [batch, kv_heads, max_len, head_dim]
that never moves, so a captured decode step can write into it and read from it on every replay.
Sequences of a batch share the slot index: slot s holds the s-th token of every row, left padding
included, exactly as transformers lays out its own caches; which slots a row may attend to is the
attention mask's business (`valid`: [batch, max_len] bool, True at real tokens).

The cache is not a subclass of transformers' `Cache` (whose constructor changes between
versions): it offers what the decoder layers call during a forward with explicit `position_ids`
and a prepared 4D mask, namely `update(key, value, layer_idx, ...)`. Masks given as 4D tensors
(or as a {attention type: mask} dict, for models that mix sliding and full layers) are returned
as-is by transformers' masking utilities, so the model's own forward runs no mask code that
would read tensor values on the host.
"""

from __future__ import annotations

import torch


class StaticKVCache:
    """Keys/values of every attention layer, allocated on the first write of each layer.

    batch, max_len: the static sizes (a decode graph is captured for one pair).
    slots:   [S] long, the slots the current forward writes (S = its number of new tokens); the
             caller points it at a persistent buffer before a captured step.
    visible: how many leading slots attention reads (the prompt length during prefill, so the
             prefill's attention does not run over the empty tail; max_len while decoding).
    """

    def __init__(self, batch: int, max_len: int):
        self.batch, self.max_len = batch, max_len
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []
        self.slots: torch.Tensor | None = None
        self.visible = max_len
        self.updates = 0  # writes since the last reset_count(): proves every layer used this cache

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write key/value_states [batch, kv_heads, S, head_dim] at `slots`; return the visible
        keys and values [batch, kv_heads, visible, head_dim] (views, no copy). Extra arguments
        (older transformers pass cache_kwargs with cache_position) are not needed: `slots` says where."""
        while len(self.keys) <= layer_idx:
            self.keys.append(None)
            self.values.append(None)
        if self.keys[layer_idx] is None:
            # Lazily, so heads/head_dim/dtype come from the layer itself (they may differ by layer).
            self.keys[layer_idx] = key_states.new_zeros(
                (self.batch, key_states.shape[1], self.max_len, key_states.shape[-1]))
            self.values[layer_idx] = value_states.new_zeros(
                (self.batch, value_states.shape[1], self.max_len, value_states.shape[-1]))
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, self.slots, key_states.to(keys.dtype))
        values.index_copy_(2, self.slots, value_states.to(values.dtype))
        self.updates += 1
        return keys[:, :, : self.visible], values[:, :, : self.visible]

    # What model code may ask a cache for during a forward with explicit positions and a 4D mask.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Unused by the masks and positions we pass; 0 keeps transformers' fallback arithmetic cheap."""
        return 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.visible, 0

    def __len__(self) -> int:
        return len(self.keys)

    def layers_written(self) -> int:
        return sum(k is not None for k in self.keys)


# --- masks ------------------------------------------------------------------------------------------
#
# `kind` follows what transformers builds for the attention implementation: "bool" (SDPA: True =
# attend) or "additive" (eager: 0 = attend, the dtype's minimum = masked), so both paths add the
# same numbers to the scores as transformers' own generate does.


def _as_kind(allowed: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    if kind == "bool":
        return allowed
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def prefill_mask(valid: torch.Tensor, window: int | None, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, P, P] mask for a prompt; valid: [B, P] bool (False at padding).

    Query i sees slot j <= i that is a real token (and j > i - window for a sliding layer). A
    padding query also sees itself: a row with nothing to attend to would give NaN in some SDPA
    kernels, and its K/V would then poison the masked-out slots' products (0 * NaN). The real
    tokens never see padding, so their outputs are those of transformers' mask.
    """
    length = valid.shape[1]
    index = torch.arange(length, device=valid.device)
    causal = index[None, :] <= index[:, None]  # [P (query), P (key)]
    if window is not None:
        causal = causal & (index[None, :] > index[:, None] - window)
    allowed = (causal[None] & valid[:, None, :]) | torch.eye(length, dtype=torch.bool, device=valid.device)[None]
    return _as_kind(allowed[:, None], kind, dtype)


def decode_mask(valid: torch.Tensor, slot: torch.Tensor, window: int | None, kind: str,
                dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, 1, L] mask for one new token per row written at `slot` ([1] long); valid: [B, L] bool,
    already True at `slot`. Built from tensors only: no host sync, the same kernels every step."""
    allowed = valid
    if window is not None:
        index = torch.arange(valid.shape[1], device=valid.device)
        allowed = allowed & (index > slot - window)[None, :]
    return _as_kind(allowed[:, None, None, :], kind, dtype)
