"""Verified exports: every artefact passes against the model it came from, and each check fails on a
planted defect (a dropped adapter, a corrupted tensor, a wrong chat template)."""

from __future__ import annotations

import json

import pytest
import torch
from export_helpers import lora_model
from safetensors.torch import load_file, save_file

from tuneforge.export.verify import REPORT_NAME, ExportVerificationError, Reference, check_adapter, check_gguf, \
    check_merged, check_modelfile, render_go_template, training_ids, verify_exports

SMOLLM2_VOCAB = 49152


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def _tiny_base():
    from tuneforge.testing import tiny_model

    # intermediate 192: whole NF4 blocks per row (bitsandbytes' CPU dequantisation needs them).
    base = tiny_model("llama", seed=0, vocab_size=SMOLLM2_VOCAB, intermediate_size=192, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0)
    _nf4_round_trip(base)
    return base


@pytest.fixture(scope="module")
def reference(tokenizer):
    """A tiny Llama over SmolLM2's vocabulary (so its ChatML tokenizer fits) with a LoRA that moves it."""
    torch.manual_seed(0)
    model = lora_model(_tiny_base(), scale=0.05)
    return Reference(model, tokenizer, ["Name a colour.", [{"role": "user", "content": "What is 2+2?"}]],
                     new_tokens=8)


def _nf4_round_trip(model) -> None:
    """The decoder's linear weights as a QLoRA base holds them (NF4-rounded), so that a merged 4-bit
    export differs from the reference by the adapter's re-quantisation only, as in real use."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                packed, state = quantize_4bit(module.weight.data, quant_type="nf4")
                module.weight.copy_(dequantize_4bit(packed, state))


def test_adapter_passes_and_a_dropped_adapter_fails(reference, tmp_path):
    from tuneforge.export.adapter import save_adapter

    folder = save_adapter(reference.model, tmp_path / "adapter", reference.tokenizer)
    check = check_adapter(reference, folder)
    assert check.passed, check.line()
    assert check.relative_diff < 1e-6 and check.greedy_agreed == check.greedy_steps > 0
    assert reference.model.active_adapter == "default" and "tuneforge_verify" not in reference.model.peft_config
    # Planted defect: the adapter file loses the layers' B matrices (peft starts those at zero).
    weights = folder / "adapter_model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if not k.endswith("lora_B.weight")}, weights)
    check = check_adapter(reference, folder)
    assert not check.passed and "logits differ" in check.line()


def test_merged_16bit_passes_and_a_corrupted_tensor_fails(reference, tmp_path):
    from tuneforge.export.merge import merge_model

    folder = merge_model(reference.model, tmp_path / "merged", reference.tokenizer, dtype="bfloat16")
    check = check_merged(reference, folder, "merged_16bit")
    assert check.passed, check.line()
    assert 0 < check.relative_diff < 0.05
    shard = next(folder.glob("*.safetensors"))
    state = load_file(shard)
    name = "model.layers.1.mlp.down_proj.weight"
    state[name] = state[name] * -3  # one weight of 15 corrupted
    save_file(state, shard, metadata={"format": "pt"})
    check = check_merged(reference, folder, "merged_16bit")
    assert not check.passed and "FAIL merged_16bit" in check.line()


def test_merged_without_the_adapter_fails(reference, tmp_path):
    base = reference.model.get_base_model()
    with reference.model.disable_adapter():  # the base alone, as a merge that dropped the adapter writes it
        base.save_pretrained(tmp_path / "base-only")
    check = check_merged(reference, tmp_path / "base-only", "merged_16bit")
    assert not check.passed


def test_merged_4bit_passes_within_nf4_rounding(reference, tmp_path):
    from tuneforge.export.merge import ModuleSource
    from tuneforge.export.merge4bit import write_merged_4bit

    folder = write_merged_4bit(ModuleSource(reference.model), tmp_path / "nf4", torch.bfloat16, progress=False)
    check = check_merged(reference, folder, "merged_4bit")
    assert check.passed, check.line()
    assert check.tolerance == 0.35


@pytest.fixture(scope="module")
def gguf_folder(reference, tmp_path_factory):
    from tuneforge.export.gguf import save_gguf
    from tuneforge.export.merge import ModuleSource
    from tuneforge.export.ollama import write_modelfile

    folder = tmp_path_factory.mktemp("gguf")
    paths = save_gguf(ModuleSource(reference.model), reference.tokenizer, folder, ["f16"], basename="tiny",
                      progress=False)
    write_modelfile(paths[0], reference.tokenizer)
    return folder


def test_gguf_passes_in_llama_cpp_and_a_wrong_template_fails(reference, gguf_folder, tmp_path):
    pytest.importorskip("llama_cpp")
    import copy

    from tuneforge.export.gguf import save_gguf
    from tuneforge.export.merge import ModuleSource

    check = check_gguf(reference, gguf_folder / "tiny.F16.gguf")
    assert check.passed, check.line()
    assert check.template.startswith("same") and check.max_logit_diff is not None
    # Planted defect: the GGUF carries another chat template than the one the model trained with.
    wrong = copy.deepcopy(reference.tokenizer)
    wrong.chat_template = wrong.chat_template.replace("<|im_start|>assistant\n", "<|im_start|>assistant ")
    assert wrong.chat_template != reference.tokenizer.chat_template
    (path,) = save_gguf(ModuleSource(reference.model), wrong, tmp_path, ["f16"], basename="wrong", progress=False)
    check = check_gguf(reference, path)
    assert not check.passed and "differs at token" in check.template


def test_modelfile_passes_and_a_wrong_template_fails(reference, gguf_folder, tmp_path):
    check = check_modelfile(reference.tokenizer, gguf_folder / "Modelfile")
    assert check.passed, check.line()
    assert "same" in check.template
    broken = tmp_path / "Modelfile"
    broken.write_text((gguf_folder / "Modelfile").read_text().replace("<|im_start|>assistant\n", "<|im_start|>bot\n"))
    check = check_modelfile(reference.tokenizer, broken)
    assert not check.passed and "differs at token" in check.template


def test_go_template_renders_like_the_jinja(tokenizer):
    from tuneforge.data.templates import resolve_template
    from tuneforge.export.ollama import go_template

    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    text = render_go_template(go_template(resolve_template("chatml")), conversation)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
                    "Hello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="unsupported"):
        render_go_template("{{ range .Messages }}{{ .Images }}{{ end }}", conversation)


def test_verify_exports_reports_every_artefact_and_fails_loudly(reference, gguf_folder, tmp_path, capsys):
    broken = tmp_path / "Modelfile"
    broken.write_text((gguf_folder / "Modelfile").read_text().replace("<|im_end|>", "</s>", 1))
    with pytest.raises(ExportVerificationError, match="ollama"):
        verify_exports(reference, [("ollama", gguf_folder / "Modelfile"), ("ollama", broken)], tmp_path)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("PASS ollama") and lines[1].startswith("FAIL ollama")
    saved = json.loads((tmp_path / REPORT_NAME).read_text())
    assert saved["passed"] is False and [c["passed"] for c in saved["checks"]] == [True, False]
    assert saved["prompts"] == ["Name a colour.", "What is 2+2?"]


def test_training_ids_are_what_the_template_tokenizes(tokenizer):
    ids = training_ids(tokenizer)
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("fmt,against", [("merged_16bit", "16-bit base + adapter"),
                                         ("merged_4bit", "NF4 base + adapter, as trained")])
def test_cli_export_checks_against_the_run_on_its_training_prompts(reference, smollm2_dir, tmp_path, capsys, fmt,
                                                                     against):
    import shutil

    from tuneforge.cli import main
    from tuneforge.config import TrainConfig
    from tuneforge.export.adapter import TOKENIZER_FILES
    from tuneforge.data.sources import default_rows

    base_dir, run = tmp_path / "base", tmp_path / "run"
    _tiny_base().save_pretrained(base_dir)  # the reference's base, without the adapter
    for name in TOKENIZER_FILES:
        if (smollm2_dir / name).is_file():
            shutil.copy2(smollm2_dir / name, base_dir / name)
    reference.model.save_pretrained(run / "adapter")
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base_dir)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    (run / "config.resolved.json").write_text(json.dumps({"config": TrainConfig().to_dict()}))
    assert main(["export", "--adapter", str(run), "--format", fmt, "--output", str(tmp_path / "out")]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(("PASS", "FAIL")))
    assert line.startswith(f"PASS {fmt}") and line.endswith(f"vs {against}")  # a QLoRA run: TrainConfig()
    saved = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    first = default_rows("train")[0]["instruction"]
    assert saved["passed"] and first in saved["prompts"][0]
