"""Export fixtures: LoRA adapters that actually change the model, saved the way peft saves them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from export_helpers import lora_model, set_base

# test_gguf_families.py records its results through scripts/family_table.py (`import family_table`).
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))


@pytest.fixture
def tiny_adapter(tmp_path):
    """(base folder, adapter folder, peft model) for a tiny random Llama."""
    from tuneforge.testing import tiny_model

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_model("llama", seed=0).save_pretrained(base_dir)
    model = lora_model(tiny_model("llama", seed=0))
    model.save_pretrained(adapter_dir)
    set_base(adapter_dir, base_dir)
    return base_dir, adapter_dir, model
