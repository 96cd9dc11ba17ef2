"""Merged 4-bit export: an NF4 checkpoint that transformers reloads, equal to its own quantisation."""

from __future__ import annotations

import json

import torch
from export_helpers import lora_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from tuneforge.export.merge import ModuleSource, merge_model
from tuneforge.export.merge4bit import write_merged_4bit
from tuneforge.testing import tiny_model
from tuneforge.testing.bitsandbytes import exact_on_this_cpu

IDS = torch.tensor([[5, 17, 42, 101, 7, 250, 3, 99]])


def test_merged_4bit_reloads_as_transformers_own_nf4_of_the_merge(tmp_path):
    from bitsandbytes.nn import Linear4bit

    model = lora_model(tiny_model("llama", seed=0))
    ours = write_merged_4bit(ModuleSource(model), tmp_path / "nf4", torch.bfloat16, progress=False)
    # exact_on_this_cpu: as tuneforge's loader, no bitsandbytes CPU repack in eval mode (it asserts on
    # the 176-row gate/up weights) and the NF4 formula where its AVX512 dequantisation is wrong (issue 14).
    reloaded = exact_on_this_cpu(AutoModelForCausalLM.from_pretrained(ours))
    assert isinstance(reloaded.model.layers[0].mlp.down_proj, Linear4bit)
    assert not isinstance(reloaded.lm_head, Linear4bit)  # kept 16-bit, as transformers does
    config = json.loads((ours / "config.json").read_text())["quantization_config"]
    assert config["bnb_4bit_quant_type"] == "nf4" and config["load_in_4bit"]

    # Reference: the merged 16-bit model quantised by transformers + bitsandbytes on load.
    merged16 = merge_model(model, tmp_path / "bf16", dtype="bfloat16")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    reference = exact_on_this_cpu(AutoModelForCausalLM.from_pretrained(merged16, quantization_config=quant))
    for name in ("model.layers.1.self_attn.k_proj", "model.layers.0.mlp.up_proj"):
        got, want = reloaded.get_submodule(name).weight, reference.get_submodule(name).weight
        assert torch.equal(got.data, want.data), name
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, reference(IDS).logits, atol=0, rtol=0)
        # And it is still the fine-tuned model, up to NF4's rounding.
        got, want = reloaded(IDS).logits.float().flatten(), model(IDS).logits.flatten()
    assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.95
