"""cos / sin tables for RoPE from a transformers config, equal to the model's own rotary module.

A test helper: the kernel (kernels/rope.py) takes cos and sin as inputs; the patched models get
them from transformers' rotary module. tests/kernels/test_rope.py checks these tables against that
module for every supported rope type and feeds them to the kernel.
"""

from __future__ import annotations

import torch

# rope types whose cos/sin `rope_cos_sin` builds (through transformers' ROPE_INIT_FUNCTIONS for all
# but "default"). Each is tested against transformers' own rotary embedding module.
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


def _rope_parameters(config, layer_type: str | None) -> dict:
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict):
        raise ValueError(f"{type(config).__name__} has no rope_parameters dict; is it a RoPE model config?")
    if layer_type is not None:
        if layer_type not in params:
            raise ValueError(f"layer_type {layer_type!r} not in rope_parameters (keys: {sorted(params)})")
        return params[layer_type]
    if "rope_type" not in params:
        raise ValueError(
            f"rope_parameters of {type(config).__name__} is per layer type ({sorted(params)}); pass layer_type="
        )
    return params


def _default_inv_freq(config, params: dict) -> torch.Tensor:
    # The models' own compute_default_rope_parameters: 1 / theta^(2i / dim) over the rotated dims.
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    return 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def rope_cos_sin(
    config,
    position_ids: torch.Tensor,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    layer_type: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [batch, seq, rotary_dim] for `position_ids: [batch, seq]`, as the model's rotary module.

    The rope type comes from `config.rope_parameters` (transformers 5): "default", "linear",
    "dynamic", "llama3", "yarn" or "longrope"; inverse frequencies and the attention scaling come
    from transformers' ROPE_INIT_FUNCTIONS, so every variant follows transformers exactly. Build
    them once per forward pass and share them across layers. `layer_type` picks the entry of a
    per-layer-type rope_parameters (Gemma 3: "sliding_attention" / "full_attention").

    Stateless: "dynamic" and "longrope" pick their frequencies from this call's largest position,
    as a freshly built transformers rotary module would on the same ids (the module also remembers
    the longest sequence it has seen; this function does not).
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = _rope_parameters(config, layer_type)
    rope_type = params.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise NotImplementedError(f"rope_type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    device = torch.device(device) if device is not None else position_ids.device
    position_ids = position_ids.to(device)
    kwargs = {"layer_type": layer_type} if layer_type is not None else {}
    # The base frequencies are computed with device=None (the CPU), as transformers' rotary module
    # does at construction; GPU pow/div can differ in the last bit. Updates for long sequences
    # are computed on the positions' device, as the module's forward does.
    if rope_type == "default":
        inv_freq, scaling = _default_inv_freq(config, params), 1.0
    else:
        init = ROPE_INIT_FUNCTIONS[rope_type]
        inv_freq, scaling = init(config, None, **kwargs)
        # A tensor, as transformers passes it: the dynamic base is then computed in the same precision.
        seq_len = torch.max(position_ids) + 1
        if rope_type == "dynamic" and seq_len > config.max_position_embeddings:
            inv_freq, scaling = init(config, device, seq_len=seq_len, **kwargs)
        elif rope_type == "longrope" and seq_len > params["original_max_position_embeddings"]:
            # Long factors; the attention scaling stays the one computed at init, as in transformers.
            inv_freq, _ = init(config, device, seq_len=params["original_max_position_embeddings"] + 1, **kwargs)
    # fp32 whatever the autocast state: positions up to 1e5+ need the mantissa.
    with torch.autocast(device_type=device.type, enabled=False):
        freqs = position_ids[..., None].float() * inv_freq.to(device=device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * scaling
        sin = emb.sin() * scaling
    return cos.to(dtype), sin.to(dtype)
