"""`tuneforge export`: every format from an adapter folder, through the real CLI parser."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tuneforge.cli import main

IDS = torch.tensor([[5, 17, 42, 101, 7, 250, 3, 99]])


def test_merged_16bit_from_a_train_run_folder(tiny_adapter, tmp_path, capsys):
    _, adapter_dir, model = tiny_adapter
    run = tmp_path / "run"
    run.mkdir()
    adapter_dir.rename(run / "adapter")  # the layout `tuneforge train` writes
    code = main(["export", "--adapter", str(run), "--format", "merged_16bit", "--dtype", "float32",
                 "--output", str(tmp_path / "out")])
    assert code == 0 and "exported merged_16bit" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, model.merge_and_unload()(IDS).logits, atol=1e-5, rtol=1e-5)


def test_adapter_copy_and_merged_4bit(tiny_adapter, tmp_path):
    from bitsandbytes.nn import Linear4bit

    _, adapter_dir, _ = tiny_adapter
    assert main(["export", "--adapter", str(adapter_dir), "--format", "adapter", "--output", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == \
        (adapter_dir / "adapter_model.safetensors").read_bytes()
    assert main(["export", "--adapter", str(adapter_dir), "--format", "merged_4bit",
                 "--output", str(tmp_path / "nf4")]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4")
    assert isinstance(reloaded.model.layers[0].self_attn.q_proj, Linear4bit)


def test_gguf_with_modelfile(smollm2_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    from export_helpers import llama_cpp_quiet, lora_model, set_base

    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    lora_model(base, target_modules=["q_proj", "v_proj"], scale=0.01).save_pretrained(tmp_path / "adapter")
    set_base(tmp_path / "adapter", smollm2_dir)
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--format", "gguf", "--quantization", "q8_0",
                 "--output", str(tmp_path / "gguf")]) == 0
    gguf = tmp_path / "gguf" / "gguf.Q8_0.gguf"
    assert (tmp_path / "gguf" / "Modelfile").read_text().startswith(f"FROM ./{gguf.name}\n")
    llm = llama_cpp_quiet(gguf, n_ctx=128)
    try:
        assert len(llm.tokenize(b"hello")) > 0 and llm.n_vocab() == 49152
    finally:
        llm.close()


def test_bad_input_is_a_clear_error(tmp_path, tiny_adapter, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", "--adapter", str(empty), "--format", "gguf", "--output", str(tmp_path / "x")]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    _, adapter_dir, _ = tiny_adapter
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "missing")
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    assert main(["export", "--adapter", str(adapter_dir), "--format", "merged_16bit",
                 "--output", str(tmp_path / "y")]) == 2
    assert "neither a local folder nor fetchable" in capsys.readouterr().err


def test_push_offline_fails_before_exporting(tiny_adapter, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, adapter_dir, _ = tiny_adapter
    code = main(["export", "--adapter", str(adapter_dir), "--format", "merged_16bit", "--output",
                 str(tmp_path / "o"), "--push-to-hub", "me/tiny"])
    assert code == 2  # HubUnavailable, reported as one line rather than a traceback
    assert "offline" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
