"""The Unsloth notebook flow on the real SmolLM2, on a CPU where bitsandbytes repacks (issue 14).

load NF4 -> LoRA -> save the adapter -> load it back (as the notebook loads "lora_model") ->
for_inference -> generate -> save_pretrained_merged("merged_16bit") -> reload. On an AVX512-BF16
CPU the generate repacks every NF4 weight in place (tuneforge.integration.bnb); before the fix the
merged model's logits differed from the in-memory model's by ~50 and it wrote gibberish. On a CPU
without the feature the repack is forced after generating (bitsandbytes' own conversion).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tuneforge.integration import bnb as glue

sys.path.insert(0, str(Path(__file__).parents[1] / "export"))
from export_helpers import perturb_lora  # noqa: E402

SMOLLM2 = "tuneforge/smollm2-135m-instruct"
# Merged weights are rounded once to bf16: over 30 layers SmolLM2's logits move by ~0.5 from that
# alone (the in-memory model computes with fp32 weights). A repacked weight read as standard moved
# them by ~50.
BF16_ROUNDING = 1.5


def test_export_after_generating_equals_export_without(smollm2_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tuneforge import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(SMOLLM2, load_in_4bit=True, max_seq_length=256)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16)
    perturb_lora(model, seed=3, scale=0.01)
    model.save_pretrained(tmp_path / "lora_model")
    del model
    model, tokenizer = FastLanguageModel.from_pretrained(str(tmp_path / "lora_model"), load_in_4bit=True,
                                                         max_seq_length=256)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of Peru?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        want = model.eval()(**prompt).logits.float()  # the loaded model, standard layout
    model.save_pretrained_merged(tmp_path / "without", tokenizer, save_method="merged_16bit")

    FastLanguageModel.for_inference(model)
    answer = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(answer[0, prompt["input_ids"].shape[1]:])
    layers = glue.linear4bit_layers(model)
    if not any(glue.is_repacked(layer.weight.quant_state) for layer in layers):
        # This CPU has no AVX512-BF16: do what bitsandbytes' forward does on one.
        monkeypatch.setattr(glue, "cpu_repacks", lambda: True)
        glue.allow_cpu_repack(model)
        glue.force_cpu_repack(model)
    assert all(glue.is_repacked(layer.weight.quant_state) for layer in layers)

    model.save_pretrained_merged(tmp_path / "after", tokenizer, save_method="merged_16bit")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "after", dtype=torch.float32)
    with torch.no_grad():
        got = merged(**prompt).logits.float()
    difference = (got - want).abs().max().item()
    print(f"merged-after-generate vs in-memory logits: max |difference| {difference:.3f}")
    again = merged.generate(**prompt, max_new_tokens=8, do_sample=False)
    print(f"in memory: {answer!r}; merged: {tokenizer.decode(again[0, prompt['input_ids'].shape[1]:])!r}")

    after, without = load_file(tmp_path / "after" / "model.safetensors"), load_file(
        tmp_path / "without" / "model.safetensors")
    assert after.keys() == without.keys()
    assert all(torch.equal(after[key], without[key]) for key in after)
    assert difference < BF16_ROUNDING


@pytest.mark.skipif(not glue.cpu_repacks(), reason="needs a CPU on which bitsandbytes repacks (AVX512-BF16)")
def test_generation_keeps_the_repacked_cpu_path(smollm2_dir):
    """for_inference keeps bitsandbytes' repacked CPU gemm (faster here): every projection takes it."""
    from tuneforge import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(SMOLLM2, load_in_4bit=True, max_seq_length=256)
    FastLanguageModel.for_inference(model)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 2, 198]]))
    layers = glue.linear4bit_layers(model)
    assert layers and all(glue.is_repacked(layer.weight.quant_state) for layer in layers)
    FastLanguageModel.for_training(model)
    assert not any(glue.is_repacked(layer.weight.quant_state) for layer in layers)
