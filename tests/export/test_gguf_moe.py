"""GGUF export of mixture-of-experts models: LoRA on the experts and 4-bit (NF4) experts reach the file.

tests/export/test_gguf_families.py proves each MoE family's base model (F16 logits, Q8_0 loading and
generating). Here, per MoE family with a llama.cpp architecture (Qwen3-MoE, Mixtral):

  - LoRA on the stacked experts (peft's `target_parameters`), with and without LoRA on attention:
    the GGUF's logits equal the peft model's within 2e-3 of the range, while the adapter moves them
    by far more than that (so the experts' deltas are in the written `*_exps` tensors). The file is
    F32, so it holds the merged weights exactly as peft computes with them and the comparison
    measures the merge (F16 rounding of merged weights that are no longer float16-exact adds
    ~1e-3 on these tiny models; F16 itself is proven by test_gguf_families on float16-exact weights);
  - a QLoRA model (4-bit load: NF4 experts, tuneforge's LoRA on attention and experts) through
    `save_pretrained_gguf`: its experts are dequantised exactly and merged (the F32 file's logits
    equal the 4-bit peft model's), the file carries the family's chat template and expert counts, and the
    Ollama Modelfile is written with a TEMPLATE. (The self-verification's template checks need a
    tokenizer holding the format's special tokens, which the tests' 317-token BPE lacks; they are
    family-independent and proven on real tokenizers in test_gguf.py / test_verify.py.)
  - configs llama.cpp runs differently are refused before a file is written, and gpt-oss (not
    written by this writer) is refused with the reason.
"""

from __future__ import annotations

import peft
import pytest
import torch
from export_helpers import llama_cpp_quiet, perturb_lora
from test_gguf_families import F16_TOLERANCE, TEXTS, export, model_for, position_differences, tokenizer  # noqa: F401

from tuneforge.export.gguf_arch import UnsupportedForGGUF
from tuneforge.models.families import all_families, get_family
from tuneforge.testing import tiny_model

pytest.importorskip("llama_cpp", reason="needs the gguf extra: pip install 'tuneforge[gguf]'")

MOE_FAMILIES = sorted(name for name, spec in all_families().items() if spec.experts and spec.gguf_arch)


def test_the_moe_families_with_a_llama_cpp_architecture():
    assert MOE_FAMILIES == ["mixtral", "qwen3_moe"]


def _range_differences(llm, model, tokenizer) -> float:
    return max(float(p.max()) for p in position_differences(llm, model, tokenizer))


def _logits_range_apart(a, b, tokenizer) -> float:
    """max |a - b| / range of b's logits over the prompts (two transformers models)."""
    out = 0.0
    for text in TEXTS:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:16]])
        with torch.no_grad():
            want, got = b(ids).logits, a(ids).logits
        out = max(out, float((got - want).abs().max() / (want.max() - want.min())))
    return out


@pytest.mark.parametrize("targets", ["experts", "attention+experts"])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_lora_on_experts_is_merged_into_the_gguf(family, targets, tokenizer, tmp_path):
    spec = get_family(family)
    base = model_for(family)
    modules = list(spec.lora_targets) if targets == "attention+experts" else []
    model = peft.get_peft_model(model_for(family), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=modules, target_parameters=list(spec.experts)))
    perturb_lora(model, scale=0.2)
    model.eval()
    moved = _logits_range_apart(model, base, tokenizer)
    assert moved > 50 * F16_TOLERANCE, moved  # the adapter is far from a no-op

    llm = llama_cpp_quiet(export(model, tokenizer, tmp_path, "f32"), n_ctx=128, logits_all=True)
    try:
        differences = [float(p.max()) for p in position_differences(llm, model, tokenizer)]
    finally:
        llm.close()
    print(f"{family} LoRA on {targets}: llama.cpp vs peft per prompt {differences} (adapter moved {moved:.3f})")
    assert max(differences) < F16_TOLERANCE, differences


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_qlora_model_exports_dequantised_experts_with_template_and_modelfile(family, tokenizer, tmp_path):
    from tuneforge import FastLanguageModel
    from tuneforge.data.templates import get_chat_template
    from tuneforge.export import save_pretrained_gguf

    spec = get_family(family)
    folder = tmp_path / "base"
    # Full attention: the tiny Mixtral's 16-token window would cap the GGUF's context at 16.
    model_for(family, sliding_window=None).save_pretrained(folder)
    model, _ = FastLanguageModel.from_pretrained(str(folder), max_seq_length=64, dtype=torch.float32,
                                                 load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0)
    assert any(name.endswith("_nf4") for name, _ in model.named_buffers())  # NF4 experts
    assert any("experts" in name and "lora_B" in name for name, _ in model.named_parameters())
    perturb_lora(model, scale=0.2)
    model.eval()
    get_chat_template(tokenizer, spec.chat_template, map_eos_token=False)

    out = tmp_path / "gguf"
    [path] = save_pretrained_gguf(model, out, tokenizer, quantization_method="f32", verify=False)
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{path.name}") and "TEMPLATE" in modelfile and "PARAMETER stop" in modelfile

    llm = llama_cpp_quiet(path, n_ctx=128, logits_all=True)
    try:
        assert llm.metadata["general.architecture"] == spec.gguf_arch
        assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
        assert int(llm.metadata[f"{spec.gguf_arch}.expert_count"]) == 4
        assert int(llm.metadata[f"{spec.gguf_arch}.expert_used_count"]) == 2
        differences = [float(p.max()) for p in position_differences(llm, model, tokenizer)]
    finally:
        llm.close()
    print(f"{family} QLoRA (NF4 experts): llama.cpp vs the 4-bit peft model per prompt {differences}")
    assert max(differences) < F16_TOLERANCE, differences


@pytest.mark.parametrize("family, changes, message", [
    ("qwen3_moe", dict(norm_topk_prob=False), "renormalises"),
    ("qwen3_moe", dict(decoder_sparse_step=2), "dense MLP layers"),
    ("qwen3_moe", dict(mlp_only_layers=[0]), "dense MLP layers"),
    ("gpt_oss", {}, "attention sinks"),
])
def test_moe_configs_llama_cpp_runs_differently_are_refused(family, changes, message, tokenizer, tmp_path):
    model = tiny_model(family, **changes)
    with pytest.raises(UnsupportedForGGUF, match=message):
        export(model, tokenizer, tmp_path, "f16")
    assert not list(tmp_path.glob("*.gguf"))


def test_q8_0_keeps_the_router_in_f32(tokenizer, tmp_path):
    import gguf

    path = export(model_for("qwen3_moe"), tokenizer, tmp_path, "q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.ffn_gate_inp.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.ffn_gate_exps.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert {f"blk.{i}.ffn_{p}_exps.weight" for i in (0, 1) for p in ("gate", "up", "down")} <= set(types)
    assert not any("gate_up" in name for name in types)  # llama.cpp's qwen3moe reads gate and up apart
