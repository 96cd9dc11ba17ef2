"""Merged 16-bit export: the same model as peft's merge_and_unload, streamed shard by shard."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from export_helpers import ALL_LINEAR, lora_model, set_base
from tuneforge.export.merge import merge_adapter_folder, merge_model
from tuneforge.testing import tiny_model
from tuneforge.testing.bitsandbytes import exact_on_this_cpu

IDS = torch.tensor([[5, 17, 42, 101, 7, 250, 3, 99]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.float()


def peft_merged(model):
    return model.merge_and_unload().eval()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merged_folder_equals_peft_merge_and_unload(tiny_adapter, tmp_path, dtype):
    base_dir, adapter_dir, model = tiny_adapter
    out = merge_adapter_folder(adapter_dir, tmp_path / "merged", dtype=dtype)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    expected = peft_merged(model)
    if dtype == "bfloat16":
        # Ours rounds the fp32 merge once; so does casting peft's fp32 merge: the weights agree bit for bit.
        for name, weight in expected.state_dict().items():
            assert torch.equal(merged.state_dict()[name], weight.to(torch.bfloat16).float()), name
        expected = expected.to(torch.bfloat16).float()
    torch.testing.assert_close(logits(merged), logits(expected), atol=1e-5, rtol=1e-5)
    # And the merge did something: the adapter moves the logits.
    assert (logits(merged) - logits(tiny_model("llama", seed=0))).abs().max() > 1e-2
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype


def test_in_memory_merge_equals_peft(tmp_path):
    model = lora_model(tiny_model("llama", seed=0), use_rslora=True, alpha_pattern={"down_proj": 32},
                       rank_pattern={"q_proj": 2})
    out = merge_model(model, tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(logits(merged), logits(peft_merged(model)), atol=1e-5, rtol=1e-5)


def test_patterns_embeddings_and_modules_to_save_from_folder(tmp_path):
    """rsLoRA, per-module alpha/rank, a LoRA on the embedding and a fully trained lm_head."""
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_model("llama", seed=0).save_pretrained(base_dir)
    model = lora_model(tiny_model("llama", seed=0), target_modules=ALL_LINEAR + ["embed_tokens"],
                       modules_to_save=["lm_head"], use_rslora=True, alpha_pattern={"up_proj": 3},
                       rank_pattern={"k_proj": 2})
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    model.save_pretrained(adapter_dir)
    set_base(adapter_dir, base_dir)
    out = merge_adapter_folder(adapter_dir, tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(logits(merged), logits(peft_merged(model)), atol=1e-5, rtol=1e-5)


def test_tied_model_whose_head_is_trained_gets_untied(tmp_path):
    base = tiny_model("llama", seed=0, tie_word_embeddings=True)
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base.save_pretrained(base_dir)
    model = lora_model(tiny_model("llama", seed=0, tie_word_embeddings=True),
                       target_modules=ALL_LINEAR + ["lm_head"])
    model.save_pretrained(adapter_dir)
    set_base(adapter_dir, base_dir)
    expected = logits(model)  # unmerged forward: lm_head = embedding + its own delta
    for out in (merge_adapter_folder(adapter_dir, tmp_path / "from-folder", dtype="float32"),
                merge_model(model, tmp_path / "in-memory", dtype="float32")):
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=1e-5)


def test_nf4_base_is_dequantised_exactly(tmp_path):
    """A QLoRA model: base NF4 in memory, and a pre-quantised NF4 checkpoint on disk, merge the same."""
    import bitsandbytes.functional as bnbf
    from transformers import BitsAndBytesConfig

    tiny_model("llama", seed=0).save_pretrained(tmp_path / "fp32")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    qbase = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=quant, dtype=torch.float32)
    # As tuneforge's loader: no bitsandbytes CPU repack in eval mode (it asserts on the 176-row
    # gate/up weights), the NF4 formula where its AVX512 dequantisation is wrong (issue 14).
    exact_on_this_cpu(qbase)
    qbase.save_pretrained(tmp_path / "nf4")
    model = lora_model(qbase)
    in_memory = merge_model(model, tmp_path / "in-memory", dtype="float32")
    model.save_pretrained(tmp_path / "adapter")
    set_base(tmp_path / "adapter", tmp_path / "nf4")
    from_disk = merge_adapter_folder(tmp_path / "adapter", tmp_path / "from-disk", dtype="float32")

    # Reference: bitsandbytes' own dequantisation of each NF4 weight plus peft's delta.
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    expected = (bnbf.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state).float()
                + layer.get_delta_weight("default").float())
    for out in (in_memory, from_disk):
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert "quantization_config" not in json.loads((out / "config.json").read_text())
        torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, expected, atol=0, rtol=0)
    a, b = (AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32) for out in (in_memory, from_disk))
    torch.testing.assert_close(logits(a), logits(b), atol=0, rtol=0)
    torch.testing.assert_close(logits(a), logits(model), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_smollm2_merge_equals_peft(smollm2_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    model = lora_model(base, scale=0.02)
    model.save_pretrained(tmp_path / "adapter")
    set_base(tmp_path / "adapter", smollm2_dir)
    out = merge_adapter_folder(tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 2, 198]])
    got = logits(merged, ids)
    want = logits(peft_merged(model), ids)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert (out / "tokenizer.json").is_file()  # the tokenizer travels with the merged model


# A Llama with large layers written straight into 12 shards: about 10x the budget we hold the merge to.
_WIDE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=12, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=1024, max_position_embeddings=64)

_MEASURE = textwrap.dedent("""
    import json, sys
    import torch, safetensors, tuneforge.export.merge as m  # imports first: they are not the merge
    before = m.peak_rss_bytes()
    m.merge_adapter_folder(sys.argv[1], sys.argv[2], dtype="float16", max_shard_size="40MB")
    after = m.peak_rss_bytes()
    print(json.dumps({"before": before, "after": after}))
""")


@pytest.mark.slow
def test_streamed_merge_peak_memory_stays_below_the_model(tmp_path):
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(**_WIDE)
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base_dir.mkdir()
    adapter_dir.mkdir()
    config.save_pretrained(base_dir)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in AutoModelForCausalLM.from_config(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    weight_map, shard, shard_bytes, count, total = {}, {}, 0, 0, 0
    names = list(shapes)
    for index, name in enumerate(names):
        tensor = torch.randn(shapes[name], generator=generator) * 0.02
        shard[name] = tensor
        shard_bytes += tensor.numel() * 4
        if shard_bytes > 60e6 or index == len(names) - 1:
            count += 1
            file = f"part-{count}.safetensors"
            save_file(shard, str(base_dir / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in shard})
            total += shard_bytes
            shard, shard_bytes = {}, 0
    (base_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    # An adapter on every linear layer, in peft's file format.
    adapter = {}
    for name, shape in shapes.items():
        if name.endswith("proj.weight"):
            module = "base_model.model." + name.removesuffix(".weight")
            adapter[module + ".lora_A.weight"] = torch.randn(8, shape[1], generator=generator) * 0.01
            adapter[module + ".lora_B.weight"] = torch.randn(shape[0], 8, generator=generator) * 0.01
    save_file(adapter, str(adapter_dir / "adapter_model.safetensors"))
    (adapter_dir / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "base_model_name_or_path": str(base_dir)}))
    del adapter

    result = subprocess.run([sys.executable, "-c", _MEASURE, str(adapter_dir), str(tmp_path / "merged")],
                            capture_output=True, text=True, check=True)
    rss = json.loads(result.stdout.strip().splitlines()[-1])
    merge_peak = rss["after"] - rss["before"]
    assert total > 700e6 and count >= 10
    # The merge itself (peak RSS above the imports' baseline) holds one 60 MB shard in, one 40 MB
    # shard out, a few fp32 working tensors and the allocator's slack: ~300 MB, not the 814 MB model.
    assert merge_peak < total / 2, f"merge added {merge_peak / 1e6:.0f} MB for a {total / 1e6:.0f} MB model"
    assert rss["after"] < total, f"peak RSS {rss['after'] / 1e6:.0f} MB >= model {total / 1e6:.0f} MB"
    # Spot-check one merged tensor against the formula.
    from safetensors import safe_open

    out_index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.3.mlp.down_proj.weight"
    with safe_open(str(base_dir / weight_map[name]), "pt") as f:
        base_weight = f.get_tensor(name)
    from safetensors.torch import load_file

    lora = load_file(str(adapter_dir / "adapter_model.safetensors"))
    module = "base_model.model.model.layers.3.mlp.down_proj"
    want = (base_weight + 2.0 * lora[module + ".lora_B.weight"] @ lora[module + ".lora_A.weight"]).half()
    with safe_open(str(tmp_path / "merged" / out_index[name]), "pt") as f:
        assert torch.equal(f.get_tensor(name), want)
