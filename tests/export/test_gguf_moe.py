"""GGUF export of mixture-of-experts models: LoRA on the experts and 4-bit (NF4) experts reach the file.

tests/export/test_gguf_families.py proves each MoE family's base model (F16 logits within 2e-3 of
the range, Q8_0 loading and generating). Here, per MoE family with a llama.cpp architecture
(Qwen3-MoE as qwen3moe, Mixtral as llama, gpt-oss as gpt-oss):

  - LoRA on the stacked experts (peft's `target_parameters`), with and without LoRA on attention:
    the GGUF's logits equal the peft model's, while the adapter moves them by a third of the range
    or more (so the experts' deltas are in the written `*_exps` tensors). The file is F32 and runs
    with an F32 KV cache, so it holds the merged weights exactly as peft computes with them and
    the comparison measures the merge to float32 summation order (1e-5 of the range);
  - a QLoRA model (4-bit load: NF4 experts, tuneforge's LoRA on attention and experts) through
    `save_pretrained_gguf`: its experts are dequantised exactly and merged (the logits equal the
    4-bit peft model's likewise), the file carries the family's chat template and expert counts,
    and the Ollama Modelfile is written with a TEMPLATE. (The self-verification's template checks
    need a tokenizer holding the format's special tokens, which the tests' 317-token BPE lacks;
    they are family-independent and proven on real tokenizers in test_gguf.py / test_verify.py.)
  - configs llama.cpp runs differently are refused before a file is written;
  - gpt-oss's fractional YaRN range (truncate=false, every real gpt-oss), which llama.cpp rounds to
    whole dimensions: the exporter warns, and the difference is measured (it must stay small on
    48 tokens, and is there: if llama.cpp learns fractional ranges this test says so).
"""

from __future__ import annotations

import numpy as np
import peft
import pytest
import torch
from export_helpers import llama_cpp_quiet, perturb_lora
from test_gguf_families import (  # noqa: F401
    TEXTS,
    context_length,
    export,
    logits_of,
    model_for,
    prompts,
    tokenizer,
)

from tuneforge.export.gguf_arch import UnsupportedForGGUF
from tuneforge.models.families import all_families, get_family
from tuneforge.testing import tiny_model

pytest.importorskip("llama_cpp", reason="needs the gguf extra: pip install 'tuneforge[gguf]'")

MOE_FAMILIES = sorted(name for name, spec in all_families().items() if spec.experts and spec.gguf_arch)


def test_the_moe_families_with_a_llama_cpp_architecture():
    assert MOE_FAMILIES == ["gpt_oss", "mixtral", "qwen3_moe"]


# F32 files run with an F32 KV cache (GGML_TYPE_F32 = 0): llama.cpp then computes what transformers
# does up to float32 summation order (measured <= 6e-7 of the logit range), so the comparison is
# exact enough that no router decision can part (a near-tied MoE router tips under llama.cpp's
# default F16 cache: ~10 % of the range at that token).
F32_CACHE = {"type_k": 0, "type_v": 0}
TOLERANCE = 1e-5  # of the logit range


def differences(llm, model, tokenizer) -> list[float]:
    """Per prompt: max |llama.cpp - transformers| over every position and token, / the logit range."""
    out = []
    for ids in prompts(tokenizer, context_length(llm)):
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0].numpy()
        out.append(float(np.abs(logits_of(llm, ids) - want).max() / (want.max() - want.min())))
    return out


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
    perturb_lora(model, scale=0.1)
    model.eval()
    moved = _logits_range_apart(model, base, tokenizer)
    assert moved > 0.1, moved  # the adapter is far from a no-op

    llm = llama_cpp_quiet(export(model, tokenizer, tmp_path, "f32"), n_ctx=128, logits_all=True, **F32_CACHE)
    try:
        found = differences(llm, model, tokenizer)
    finally:
        llm.close()
    print(f"{family} LoRA on {targets}: llama.cpp vs peft per prompt {found} (adapter moved {moved:.3f})")
    assert max(found) < TOLERANCE, found


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_qlora_model_exports_dequantised_experts_with_template_and_modelfile(family, tokenizer, tmp_path):
    from tuneforge import FastLanguageModel
    from tuneforge.data.templates import get_chat_template
    from tuneforge.export import save_pretrained_gguf

    spec = get_family(family)
    folder = tmp_path / "base"
    # Full attention for Mixtral: its tiny 16-token window would cap the GGUF's context at 16.
    model_for(family, **({"sliding_window": None} if family == "mixtral" else {})).save_pretrained(folder)
    model, _ = FastLanguageModel.from_pretrained(str(folder), max_seq_length=64, dtype=torch.float32,
                                                 load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0)
    assert any(name.endswith("_nf4") for name, _ in model.named_buffers())  # NF4 experts
    assert any("experts" in name and "lora_B" in name for name, _ in model.named_parameters())
    perturb_lora(model, scale=0.1)
    model.eval()
    get_chat_template(tokenizer, spec.chat_template, map_eos_token=False)

    out = tmp_path / "gguf"
    [path] = save_pretrained_gguf(model, out, tokenizer, quantization_method="f32", verify=False)
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{path.name}") and "TEMPLATE" in modelfile and "PARAMETER stop" in modelfile

    llm = llama_cpp_quiet(path, n_ctx=128, logits_all=True, **F32_CACHE)
    try:
        assert llm.metadata["general.architecture"] == spec.gguf_arch
        assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
        assert int(llm.metadata[f"{spec.gguf_arch}.expert_count"]) == 4
        assert int(llm.metadata[f"{spec.gguf_arch}.expert_used_count"]) == 2
        found = differences(llm, model, tokenizer)
    finally:
        llm.close()
    print(f"{family} QLoRA (NF4 experts): llama.cpp vs the 4-bit peft model per prompt {found}")
    assert max(found) < TOLERANCE, found


@pytest.mark.parametrize("family, changes, message", [
    ("qwen3_moe", dict(norm_topk_prob=False), "renormalises"),
    ("qwen3_moe", dict(decoder_sparse_step=2), "dense MLP layers"),
    ("qwen3_moe", dict(mlp_only_layers=[0]), "dense MLP layers"),
    ("gpt_oss", dict(swiglu_limit=10.0), "1.702 and 7.0"),
    ("gpt_oss", dict(attention_bias=False), "biases"),
    ("gpt_oss", dict(layer_types=["full_attention", "sliding_attention"]), "sliding"),
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


def test_gpt_oss_fractional_yarn_is_exported_as_llama_cpp_runs_it(tokenizer, tmp_path, caplog):
    rope = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "original_max_position_embeddings": 4096,
            "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}  # gpt-oss-20b's
    model = model_for("gpt_oss", rope_parameters=rope)
    with caplog.at_level("WARNING", logger="tuneforge.export.gguf_arch"):
        path = export(model, tokenizer, tmp_path, "f32")
    assert "rounds YaRN's correction range" in caplog.text
    llm = llama_cpp_quiet(path, n_ctx=128, logits_all=True, **F32_CACHE)
    try:
        found = differences(llm, model, tokenizer)
    finally:
        llm.close()
    print(f"gpt_oss, YaRN truncate=false: llama.cpp vs transformers per prompt {found}")
    assert TOLERANCE < max(found) < 1e-2, found
