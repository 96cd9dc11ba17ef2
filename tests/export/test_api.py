"""The Unsloth-named export methods bound onto a model: save_pretrained_merged / _gguf, push_to_hub_*."""

from __future__ import annotations

import pytest
import torch
from export_helpers import lora_model
from transformers import AutoModelForCausalLM

from tuneforge.export import attach_export_methods
from tuneforge.testing import tiny_model
from tuneforge.testing.bitsandbytes import exact_on_this_cpu

IDS = torch.tensor([[5, 17, 42, 101, 7, 250, 3, 99]])


@pytest.fixture
def model():
    return attach_export_methods(lora_model(tiny_model("llama", seed=0)))


@pytest.mark.parametrize("save_method", ["lora", "merged_16bit", "merged_4bit"])
def test_save_pretrained_merged_methods(model, tmp_path, save_method):
    out = model.save_pretrained_merged(tmp_path / save_method, None, save_method=save_method)
    if save_method == "lora":
        assert (out / "adapter_config.json").is_file()
        return
    # exact_on_this_cpu: as tuneforge's loader, no bitsandbytes CPU repack of the NF4 reload in eval
    # mode (it asserts on the tiny 176-row weights on AVX512-BF16 CPUs, issue 14).
    reloaded = exact_on_this_cpu(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32))
    with torch.no_grad():
        got, want = reloaded(IDS).logits.float(), model(IDS).logits
    # bfloat16 (the default for an fp32 model) or NF4 rounding away from the unmerged forward.
    tolerance = 0.02 if save_method == "merged_16bit" else 0.2
    assert (got - want).abs().max() < tolerance * want.abs().max()


def test_merged_4bit_forced_is_merged_4bit(model, tmp_path):
    """Unsloth's notebooks write save_method="merged_4bit_forced": the same NF4 export."""
    from safetensors.torch import load_file

    forced = model.save_pretrained_merged(tmp_path / "forced", None, save_method="merged_4bit_forced")
    plain = model.save_pretrained_merged(tmp_path / "plain", None, save_method="merged_4bit")
    got, want = load_file(forced / "model.safetensors"), load_file(plain / "model.safetensors")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_unknown_and_unsupported_arguments_are_errors(model, tmp_path):
    with pytest.raises(ValueError, match="save_method"):
        model.save_pretrained_merged(tmp_path, None, save_method="merged_8bit")
    with pytest.raises(NotImplementedError, match="maximum_memory_usage"):
        model.save_pretrained_merged(tmp_path, None, maximum_memory_usage=0.5)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        model.save_pretrained_gguf(tmp_path, None)


def test_save_pretrained_gguf_writes_file_and_modelfile(smollm2_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    from export_helpers import llama_cpp_quiet
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = attach_export_methods(lora_model(tiny_model("llama", seed=0, vocab_size=49152)))
    paths = model.save_pretrained_gguf(tmp_path / "tiny", tokenizer, quantization_method="not_quantized")
    assert [p.name for p in paths] == ["tiny.F16.gguf"]
    assert (tmp_path / "tiny" / "Modelfile").is_file()
    assert (tmp_path / "tiny" / "Modelfile").read_text().startswith("FROM ./tiny.F16.gguf\n")
    llm = llama_cpp_quiet(paths[0], n_ctx=64, logits_all=True)
    try:
        llm.eval([5, 17, 42])
        import numpy as np

        got = np.array(llm.scores[2])
    finally:
        llm.close()
    with torch.no_grad():
        want = model(torch.tensor([[5, 17, 42]])).logits[0, -1].numpy()
    assert abs(got - want).max() < 0.02 * abs(want).max() + 1e-3


def test_one_modelfile_per_folder_follows_the_latest_call(smollm2_dir, tmp_path, caplog):
    """Notebooks save several quantisations into one folder, one cell each: the folder keeps one
    Modelfile, FROM the GGUF of the latest call, and the replacement is logged."""
    import logging

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = attach_export_methods(lora_model(tiny_model("llama", seed=0, vocab_size=49152)))
    model.save_pretrained_gguf(tmp_path / "model", tokenizer, quantization_method=["f16", "q8_0"])
    modelfile = tmp_path / "model" / "Modelfile"
    assert modelfile.read_text().startswith("FROM ./model.F16.gguf\n")
    with caplog.at_level(logging.WARNING, logger="tuneforge.export"):
        model.save_pretrained_gguf(tmp_path / "model", tokenizer, quantization_method="q8_0")
    assert modelfile.read_text().startswith("FROM ./model.Q8_0.gguf\n")
    assert "pointed at ./model.F16.gguf; it now points at ./model.Q8_0.gguf" in caplog.text
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["Modelfile", "export_report.json", "model.F16.gguf",
                                                                    "model.Q8_0.gguf"]
