"""Tiny random models built from configs: hidden 64, 2 layers, a small vocabulary.

Each family's differences (norm variant, activation, soft-capping, ...) come from the family
table in `tuneforge.models.families`; this module only shrinks the dimensions.
"""

import torch

# Odd on purpose where the kernels care: vocab not a power of two, intermediate not a multiple of 64.
TINY_DIMENSIONS = dict(
    vocab_size=317,
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def tiny_config(family: str = "llama", **overrides):
    """A transformers config of `family` shrunk to TINY_DIMENSIONS (plus `overrides`)."""
    from tuneforge.models.families import get_family

    spec = get_family(family)
    values = dict(TINY_DIMENSIONS)
    values.update(spec.tiny_config_overrides)
    values.update(overrides)
    return spec.config_class()(**values)


def tiny_model(family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised causal LM of `family`, deterministic for a given seed."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()
