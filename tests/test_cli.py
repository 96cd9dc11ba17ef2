"""The `tuneforge` command: clear errors with exit code 2, no traceback."""

import subprocess
import sys


def _run(*args):
    return subprocess.run([sys.executable, "-m", "tuneforge.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_train_with_bad_config_exits_2_naming_the_key(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("lora:\n  rank: 8\n")
    result = _run("train", str(config))
    assert result.returncode == 2
    assert "unknown config key 'lora.rank'" in result.stderr
    assert "Traceback" not in result.stderr


def test_train_with_missing_model_exits_2_naming_it(tmp_path):
    config = tmp_path / "missing.yaml"
    config.write_text("model:\n  name: ./nowhere/model\n")
    result = _run("train", str(config), "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "model path not found: ./nowhere/model" in result.stderr


def test_help_lists_the_subcommands():
    result = _run("--help")
    assert result.returncode == 0
    for command in ("train", "export", "chat", "plot", "eval"):
        assert command in result.stdout
