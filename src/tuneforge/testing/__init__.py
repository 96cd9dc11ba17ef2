"""Test fixtures that need no network: tiny random models per family, the shipped real models."""

from tuneforge.testing.tiny import TINY_DIMENSIONS, tiny_config, tiny_model

__all__ = ["TINY_DIMENSIONS", "tiny_config", "tiny_model"]
