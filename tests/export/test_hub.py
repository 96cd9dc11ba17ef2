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
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")  # conftest sets it; any offline variable means offline
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # A closed local port: the connection is refused at once, no network involved.
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(HubUnavailable, match=rf"cannot reach the Hugging Face Hub.*saved in {tmp_path}"):
        push_folder(tmp_path, "me/tiny", token="hf_x")


def _unreachable_hub(monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")  # conftest sets it; any offline variable means offline
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # refused at once, no network involved


@pytest.mark.parametrize("push", ["push_to_hub_merged", "push_to_hub_gguf"])
def test_unreachable_hub_fails_before_the_export(monkeypatch, push):
    import tuneforge.export as export

    _unreachable_hub(monkeypatch)
    ran = []
    monkeypatch.setattr(export, "save_pretrained_merged", lambda *a, **k: ran.append("merge"))
    monkeypatch.setattr(export, "save_pretrained_gguf", lambda *a, **k: ran.append("gguf"))
    model = lora_model(tiny_model("llama"))
    with pytest.raises(HubUnavailable, match="cannot reach the Hugging Face Hub.*Nothing was exported") as error:
        getattr(export, push)(model, "me/tiny", None, token="hf_x")
    assert ran == [], "the export ran before the network was checked"
    assert "/tmp" not in str(error.value)


def test_failed_upload_after_a_temporary_export_does_not_name_the_deleted_folder(monkeypatch):
    """The repo check passes, the upload then fails: the message says how to keep the export."""
    from huggingface_hub import HfApi

    import tuneforge.export as export

    _unreachable_hub(monkeypatch)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: "https://hub.example/me/tiny")
    written = []

    def fake_merge(model, folder, *args, **kwargs):
        written.append(folder)

    monkeypatch.setattr(export, "save_pretrained_merged", fake_merge)
    with pytest.raises(HubUnavailable, match="temporary folder, deleted after the call.*hf upload me/tiny") as error:
        export.push_to_hub_merged(lora_model(tiny_model("llama")), "me/tiny", None, token="hf_x")
    assert written and str(written[0]) not in str(error.value)
