"""peft glue shared by every layer above: one way to reach the model inside peft's wrappers."""

from __future__ import annotations


def base_model(model):
    """The transformers model inside a peft wrapper (PeftModel -> LoraModel -> model); `model`
    itself when it is not wrapped."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
