"""Hub pushes fail early and clearly offline, and say where the export was left."""

from __future__ import annotations

import pytest
from export_helpers import lora_model

from tuneforge.export import push_to_hub_merged
from tuneforge.export.hub import HubUnavailable, push_folder
from tuneforge.testing import tiny_model


def test_offline_mode_refuses_before_exporting(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = lora_model(tiny_model("llama"))
    with pytest.raises(HubUnavailable, match="offline mode is on.*Nothing was exported"):
        push_to_hub_merged(model, "me/tiny", save_method="merged_16bit", token="hf_x")


def test_unreachable_hub_names_the_saved_export(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # A closed local port: the connection is refused at once, no network involved.
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(HubUnavailable, match=rf"cannot reach the Hugging Face Hub.*saved in {tmp_path}"):
        push_folder(tmp_path, "me/tiny", token="hf_x")
