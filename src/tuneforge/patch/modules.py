"""What every patch shares: finding the decoder's modules, and log-once bookkeeping."""

from __future__ import annotations

# Per-call conditions that are logged once per process rather than at every layer and step.
LOGGED: set[str] = set()


def decoder_modules(model, suffix: str):
    """(name, module) for every module whose qualified name ends with `.suffix`."""
    return [(name, module) for name, module in model.named_modules() if name.endswith("." + suffix)]
