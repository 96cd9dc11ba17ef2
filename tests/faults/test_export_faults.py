"""`tuneforge export` and `tuneforge chat` under faults: a used output folder, an output over the
adapter or model, a damaged adapter, a full disk and Ctrl-C mid-export. The earlier files stay
whole in every case, and an export is never a mix of two."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tuneforge.cli import main

IDS = torch.tensor([[5, 17, 42, 101, 7, 250, 3, 99]])


@pytest.fixture
def adapter(tmp_path):
    """(base folder, adapter folder, merged reference model): a tiny Llama and a non-zero LoRA."""
    from peft import LoraConfig, get_peft_model
    from tiny_chat_model import save_tiny_chat_model

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "run" / "adapter"
    save_tiny_chat_model(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model.save_pretrained(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base_dir)
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    from tuneforge.config import TrainConfig

    # A `tuneforge train` run folder: the adapter beside the run's resolved config.
    (adapter_dir.parent / "config.resolved.json").write_text(json.dumps({"config": TrainConfig().to_dict()}))
    return base_dir, adapter_dir, model.merge_and_unload().eval()


def _export(adapter_dir: Path, output: Path, *extra: str, fmt: str = "merged_16bit") -> int:
    return main(["export", "--adapter", str(adapter_dir), "--format", fmt, "--dtype", "float32",
                 "--output", str(output), *extra])


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _no_staging_left(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_an_export_into_a_used_folder_is_refused_or_replaced_whole(adapter, tmp_path, capsys):
    """Before: merged_16bit over an earlier single-file export with another shard size kept both
    sets, and from_pretrained loaded the old model.safetensors."""
    _, adapter_dir, merged = adapter
    out = tmp_path / "out"
    assert _export(adapter_dir, out) == 0
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    earlier = _files(out)
    assert _export(adapter_dir, out, "--max-shard-size", "100KB") == 2
    err = capsys.readouterr().err
    assert f"--output {out} is not empty (" in err and "model.safetensors" in err and "Pass --overwrite" in err
    assert _files(out) == earlier
    assert _export(adapter_dir, out, "--max-shard-size", "100KB", "--overwrite") == 0
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert "model.safetensors" not in shards and len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    _no_staging_left(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, merged(IDS).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("target", ["adapter", "run", "base", "parent"])
def test_an_export_over_the_adapter_run_or_base_folder_is_refused(adapter, tmp_path, capsys, target):
    base_dir, adapter_dir, _ = adapter
    output = {"adapter": adapter_dir, "run": adapter_dir.parent, "base": base_dir, "parent": tmp_path}[target]
    before = _files(tmp_path)
    assert _export(adapter_dir, output, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "writing the export there would replace it" in err and "Traceback" not in err
    assert _files(tmp_path) == before


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("fmt", ["adapter", "merged_16bit", "gguf"])
def test_a_truncated_adapter_is_a_clear_error_and_leaves_no_folder(adapter, tmp_path, capsys, fmt):
    """Before: a traceback from safetensors, and an empty --output folder left behind."""
    _, adapter_dir, _ = adapter
    _truncate(adapter_dir / "adapter_model.safetensors")
    out = tmp_path / "out"
    assert _export(adapter_dir, out, fmt=fmt) == 2
    err = capsys.readouterr().err
    assert "adapter_model.safetensors is truncated" in err and "the adapter is damaged" in err
    assert not out.exists()


def test_a_truncated_adapter_config_is_a_clear_error(adapter, tmp_path, capsys):
    _, adapter_dir, _ = adapter
    _truncate(adapter_dir / "adapter_config.json")
    assert _export(adapter_dir, tmp_path / "out") == 2
    assert "adapter_config.json cannot be read" in capsys.readouterr().err


def test_chat_with_a_truncated_adapter_is_a_clear_error(adapter):
    _, adapter_dir, _ = adapter
    _truncate(adapter_dir / "adapter_model.safetensors")
    result = subprocess.run([sys.executable, "-m", "tuneforge.cli", "chat", "--model", str(adapter_dir.parent),
                             "--prompt", "hi", "--no-4bit"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "adapter_model.safetensors is truncated" in result.stderr and "Traceback" not in result.stderr


def _fail_on_second_shard(monkeypatch, error: BaseException):
    """The merge's shard writer: the first shard is written, the second half-written, then `error`."""
    import safetensors.torch

    original, calls = safetensors.torch.save_file, []

    def save_file(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"half a shard")
            raise error
        return original(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    return calls


@pytest.mark.parametrize("fault", ["full disk", "ctrl-c"])
def test_a_fault_mid_export_leaves_the_earlier_export_whole(adapter, tmp_path, capsys, monkeypatch, fault):
    _, adapter_dir, _ = adapter
    out = tmp_path / "out"
    assert _export(adapter_dir, out) == 0
    earlier = _files(out)
    error = OSError(errno.ENOSPC, "No space left on device") if fault == "full disk" else KeyboardInterrupt()
    calls = _fail_on_second_shard(monkeypatch, error)
    code = _export(adapter_dir, out, "--max-shard-size", "100KB", "--overwrite")
    assert len(calls) == 2
    err = capsys.readouterr().err
    if fault == "full disk":
        assert code == 2 and "no space left on the device while writing the merged_16bit export" in err
        assert "its earlier contents are untouched" in err
    else:
        assert code == 130 and "interrupted; nothing half-written was kept" in err
    assert _files(out) == earlier
    _no_staging_left(tmp_path)


def test_a_fault_in_a_first_export_leaves_no_folder(adapter, tmp_path, monkeypatch, capsys):
    _, adapter_dir, _ = adapter
    _fail_on_second_shard(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    assert _export(adapter_dir, tmp_path / "new", "--max-shard-size", "100KB") == 2
    assert not (tmp_path / "new").exists()
    _no_staging_left(tmp_path)


def test_overwrite_never_replaces_a_folder_of_other_files(adapter, tmp_path, capsys, monkeypatch):
    _, adapter_dir, _ = adapter
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    (mine / "model.safetensors").write_bytes(b"an old export")
    assert _export(adapter_dir, mine, "--overwrite") == 2
    assert "holds files that no export writes (notes.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["model.safetensors", "notes.txt"]
    monkeypatch.chdir(mine)
    assert _export(adapter_dir, Path("."), "--overwrite") == 2
    assert "is the current, home or root folder" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["model.safetensors", "notes.txt"]
