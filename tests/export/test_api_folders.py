"""save_pretrained_merged into a folder that holds an earlier export (notebooks save several exports
into one folder, cell after cell): the folder then loads as the last export, never the earlier one.

Reference: a fresh export of the same kind into an empty folder. Negative control: with the
clean-up switched off, transformers loads the earlier single-file weights (or applies the earlier
adapter again on top of merged weights), so the comparison can fail.
"""

from __future__ import annotations

import pytest
import torch
from export_helpers import lora_model
from transformers import AutoModelForCausalLM

import tuneforge.export as export
from tuneforge.export import attach_export_methods
from tuneforge.testing import tiny_model

IDS = torch.tensor([[5, 17, 42, 101, 7, 250, 3, 99]])


@pytest.fixture
def model():
    return attach_export_methods(lora_model(tiny_model("llama", seed=0)))


def _logits(folder):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(IDS).logits


def _other_model():
    """Another model whose export would be the stale one (other seed)."""
    return attach_export_methods(lora_model(tiny_model("llama", seed=3)))


def test_sharded_merge_over_a_single_file_one_loads_the_new_one(model, tmp_path):
    folder = tmp_path / "model"
    _other_model().save_pretrained_merged(folder, None, save_method="merged_16bit", verify=False)
    (folder / "model.Q8_0.gguf").write_bytes(b"not touched")
    (folder / "notes.txt").write_text("mine")
    model.save_pretrained_merged(folder, None, save_method="merged_16bit", max_shard_size="40KB", verify=False)
    fresh = model.save_pretrained_merged(tmp_path / "fresh", None, save_method="merged_16bit",
                                         max_shard_size="40KB", verify=False)
    assert not (folder / "model.safetensors").exists() and (folder / "model.safetensors.index.json").is_file()
    assert (folder / "model.Q8_0.gguf").read_bytes() == b"not touched" and (folder / "notes.txt").read_text() == "mine"
    assert torch.equal(_logits(folder), _logits(fresh))


def test_merge_over_an_adapter_does_not_apply_the_adapter_again(model, tmp_path):
    folder = tmp_path / "model"
    model.save_pretrained_merged(folder, None, save_method="lora", verify=False)
    model.save_pretrained_merged(folder, None, save_method="merged_16bit", verify=False)
    fresh = model.save_pretrained_merged(tmp_path / "fresh", None, save_method="merged_16bit", verify=False)
    assert not (folder / "adapter_config.json").exists()
    assert torch.equal(_logits(folder), _logits(fresh))


def test_without_the_clean_up_the_earlier_export_is_what_loads(model, tmp_path, monkeypatch):
    # Negative control: the comparison above fails when nothing is removed.
    monkeypatch.setattr(export, "clear_earlier_weights", lambda folder: [])
    folder = tmp_path / "model"
    _other_model().save_pretrained_merged(folder, None, save_method="merged_16bit", verify=False)
    model.save_pretrained_merged(folder, None, save_method="merged_16bit", max_shard_size="40KB", verify=False)
    fresh = model.save_pretrained_merged(tmp_path / "fresh", None, save_method="merged_16bit",
                                         max_shard_size="40KB", verify=False)
    assert not torch.equal(_logits(folder), _logits(fresh))
