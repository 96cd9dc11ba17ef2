"""tuneforge.switches: every environment variable of its table sets its field; bad values are refused
naming the variable; arguments win; one frozen object, logged in one line when a model loads."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys

import pytest

from tuneforge import switches
from tuneforge.switches import SwitchError, Switches

ALL = ("TUNEFORGE_DISABLE_KERNELS", "TUNEFORGE_VARLEN", "TUNEFORGE_LORA_GROUPS", "TUNEFORGE_FLAT_OPTIMIZER",
       "TUNEFORGE_NF4_GEMV", "TUNEFORGE_RMS_NORM_FWD", "TUNEFORGE_CACHED_LAUNCH", "TUNEFORGE_CUDA_GRAPHS", "TUNEFORGE_SOFTCAP_KERNEL", "HF_HUB_OFFLINE",
       "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "ACCELERATE_USE_FSDP")


@pytest.fixture
def clean(monkeypatch):
    """No switch variable set (conftest sets the offline ones for the whole run)."""
    for name in ALL:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_defaults_without_variables(clean):
    assert switches.from_environment() == Switches()


@pytest.mark.parametrize("variable, value, field, expected", [
    ("TUNEFORGE_DISABLE_KERNELS", "1", "kernels", False),
    ("TUNEFORGE_DISABLE_KERNELS", "yes", "kernels", False),
    ("TUNEFORGE_DISABLE_KERNELS", "0", "kernels", True),
    ("TUNEFORGE_VARLEN", "0", "varlen", False),
    ("TUNEFORGE_LORA_GROUPS", "0", "lora_groups", False),
    ("TUNEFORGE_FLAT_OPTIMIZER", "0", "flat_optimizer", False),
    ("TUNEFORGE_FLAT_OPTIMIZER", "off", "flat_optimizer", False),
    ("TUNEFORGE_NF4_GEMV", "1", "nf4_gemv", True),
    ("TUNEFORGE_RMS_NORM_FWD", "2,8", "rms_norm_launch", (2, 8)),
    ("TUNEFORGE_RMS_NORM_FWD", " 4, 16 ", "rms_norm_launch", (4, 16)),
    ("TUNEFORGE_CACHED_LAUNCH", "0", "cached_launch", False),
    ("TUNEFORGE_CACHED_LAUNCH", "1", "cached_launch", True),
    ("TUNEFORGE_CUDA_GRAPHS", "1", "cuda_graphs", True),
    ("TUNEFORGE_CUDA_GRAPHS", "0", "cuda_graphs", False),
    ("TUNEFORGE_SOFTCAP_KERNEL", "0", "softcap_kernel", False),
    ("TUNEFORGE_SOFTCAP_KERNEL", "1", "softcap_kernel", True),
    ("HF_HUB_OFFLINE", "1", "offline", True),
    ("TRANSFORMERS_OFFLINE", "true", "offline", True),
    ("HF_DATASETS_OFFLINE", "ON", "offline", True),
    ("HF_HUB_OFFLINE", "0", "offline", False),
    ("ACCELERATE_USE_FSDP", "true", "fsdp", True),
    ("ACCELERATE_USE_FSDP", "false", "fsdp", False),
])
def test_each_variable_sets_its_field(clean, variable, value, field, expected):
    clean.setenv(variable, value)
    found = switches.from_environment()
    assert getattr(found, field) == expected
    others = {f.name for f in dataclasses.fields(Switches)} - {field}
    assert all(getattr(found, name) == getattr(Switches(), name) for name in others)


def test_every_variable_of_the_table_is_tested():
    """The table in the module's docstring and the cases above name the same variables."""
    documented = {name for line in switches.__doc__.splitlines() if line.startswith("| ") and "---" not in line
                  for name in line.split("|")[1].replace(",", " ").split() if name.isupper()}
    assert documented == set(ALL) | {"TRITON_INTERPRET"}


@pytest.mark.parametrize("value", ["0", "1"])
def test_triton_interpret_is_read_once_at_import(value):
    """Triton reads it when it is imported, so the switch is fixed for the process: a fresh one."""
    import os

    # The module alone, loaded from its file: importing the tuneforge package would load torch.
    code = ("import importlib.util as u, sys; s = u.spec_from_file_location('s', %r); "
            "m = sys.modules['s'] = u.module_from_spec(s); s.loader.exec_module(m); "
            "print(m.from_environment().triton_interpreter)" % switches.__file__)
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": value},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(value == "1")


@pytest.mark.parametrize("variable, value", [
    ("TUNEFORGE_DISABLE_KERNELS", "maybe"),
    ("TUNEFORGE_VARLEN", "2"),
    ("TUNEFORGE_LORA_GROUPS", "no way"),
    ("TUNEFORGE_FLAT_OPTIMIZER", "flat"),
    ("TUNEFORGE_NF4_GEMV", "fast"),
    ("TUNEFORGE_CACHED_LAUNCH", "cached"),
    ("TUNEFORGE_CUDA_GRAPHS", "graphs"),
    ("TUNEFORGE_SOFTCAP_KERNEL", "flash"),
    ("ACCELERATE_USE_FSDP", "sharded"),
    ("TUNEFORGE_RMS_NORM_FWD", "2"),
    ("TUNEFORGE_RMS_NORM_FWD", "3,8"),
    ("TUNEFORGE_RMS_NORM_FWD", "2,64"),
    ("TUNEFORGE_RMS_NORM_FWD", "2,3"),
])
def test_bad_values_are_refused_naming_the_variable(clean, variable, value):
    clean.setenv(variable, value)
    with pytest.raises(SwitchError, match=rf"^{variable}={value!r}: "):
        switches.from_environment()


def test_arguments_win_over_the_environment(clean):
    clean.setenv("TUNEFORGE_DISABLE_KERNELS", "1")
    clean.setenv("ACCELERATE_USE_FSDP", "true")
    clean.setenv("HF_HUB_OFFLINE", "1")
    found = switches.from_environment(kernels=True, fsdp=False, offline=None)
    assert found.kernels and not found.fsdp
    assert found.offline  # None: the environment decides
    with pytest.raises(TypeError, match="unknown switches: kernel"):
        switches.from_environment(kernel=True)


def test_switches_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Switches().kernels = False


def test_line_names_every_field_on_one_line():
    line = Switches(rms_norm_launch=(2, 8), fsdp=True).line()
    assert "\n" not in line and line.startswith("switches: ")
    words = dict(word.split("=") for word in line.removeprefix("switches: ").split())
    assert list(words) == [f.name for f in dataclasses.fields(Switches)]
    assert words["kernels"] == "on" and words["nf4_gemv"] == "off" and words["fsdp"] == "on"
    assert words["cached_launch"] == "on"
    assert words["rms_norm_launch"] == "2,8" and Switches().line().count("rms_norm_launch=default") == 1


def test_resolve_makes_current(clean):
    clean.setenv("TUNEFORGE_VARLEN", "0")
    resolved = switches.resolve(nf4_gemv=True)
    assert switches.current() is resolved
    assert not resolved.varlen and resolved.nf4_gemv
    clean.setenv("TUNEFORGE_VARLEN", "1")
    assert switches.current() is resolved  # current() does not read the environment again
    assert switches.resolve().varlen and switches.current().varlen


def test_offline_is_read_at_the_moment_it_is_asked(clean):
    assert not switches.offline()
    clean.setenv("HF_DATASETS_OFFLINE", "yes")
    assert switches.offline()


def test_launcher_integers_name_the_variable(clean):
    clean.setenv("LOCAL_RANK", "3")
    assert switches.env_int("LOCAL_RANK") == 3
    clean.setenv("LOCAL_RANK", "")
    assert switches.env_int("LOCAL_RANK") is None
    clean.setenv("LOCAL_RANK", "first")
    with pytest.raises(SwitchError, match="LOCAL_RANK='first' is not an integer"):
        switches.env_int("LOCAL_RANK")


def test_facts_of_the_environment(clean, tmp_path):
    clean.delenv("TUNEFORGE_CACHE", raising=False)
    clean.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert switches.cache_root() == tmp_path / "xdg" / "tuneforge"
    clean.setenv("TUNEFORGE_CACHE", str(tmp_path / "mine"))
    assert switches.cache_root() == tmp_path / "mine"
    clean.delenv("HF_TOKEN", raising=False)
    assert switches.hub_token() is None
    clean.setenv("HF_TOKEN", "hf_x")
    assert switches.hub_token() == "hf_x"
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT"):
        clean.delenv(name, raising=False)
    assert not switches.wandb_configured() and switches.wandb_project() == "huggingface"
    clean.setenv("WANDB_MODE", "offline")
    clean.setenv("WANDB_PROJECT", "runs")
    assert switches.wandb_configured() and switches.wandb_project() == "runs"


def test_a_load_logs_the_switches_in_exactly_one_line(tiny_llama_dir, clean, caplog):
    from tuneforge import FastLanguageModel

    clean.setenv("TUNEFORGE_VARLEN", "0")
    with caplog.at_level(logging.INFO):
        model, _ = FastLanguageModel.from_pretrained(str(tiny_llama_dir), load_in_4bit=False, dtype="float32",
                                                     max_seq_length=64, use_kernels=False, fsdp=True)
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("switches:")]
    assert lines == [model.tuneforge.switches.line()]
    assert "kernels=off" in lines[0] and "varlen=off" in lines[0] and "fsdp=on" in lines[0]
    assert switches.current() is model.tuneforge.switches
