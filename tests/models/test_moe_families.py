"""Mixture-of-experts families (qwen3_moe, mixtral, gpt_oss) and models/moe.py through the public API, against
transformers + peft (+ bitsandbytes), on tiny random models (hidden 64, 2 layers, 4 experts, top 2).

- 16-bit: logits equal transformers'.
- 4-bit: attention in bitsandbytes NF4, the stacked experts in tuneforge's NF4 storage (no dense
  expert weight left); logits equal the reference, which is transformers + bitsandbytes with each
  expert stack replaced by its NF4 round trip (bitsandbytes' own quantize / dequantize,
  `testing.tiny.nf4_round_trip_experts`) running through transformers' own experts module.
- LoRA on attention and on the stacked experts (peft's target_parameters), fused experts path
  (kernels.moe): loss and every LoRA gradient equal plain peft's, 16-bit and 4-bit (QLoRA step);
  the saved adapter reloads with plain transformers + peft to the same logits.
- plain peft on our NF4 model (kernels off) computes what our fused path does.
- the routers' aux loss (output_router_logits) is transformers' through the fused loss.
- generation equals transformers'; a packed row's loss equals its samples run alone; a few
  QLoRA steps lower the loss and leave the NF4 codes alone; merging after dequantising the experts.

Tolerances: fp32 on the CPU, as tests/models/test_families.py: logits 1e-5, loss rtol 1e-5,
gradients rtol 1e-4 / atol 1e-6 (the same sums in other orders).
"""

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import tuneforge.kernels.moe as moe_kernel
from tuneforge import FastLanguageModel
from tuneforge.models.families import all_families, get_family
from tuneforge.models.moe import experts_modules, is_nf4
from tuneforge.testing.tiny import lora_grads, nf4_round_trip_experts, randomize_lora_b, tiny_batch, tiny_model

FAMILIES = sorted(name for name, spec in all_families().items() if spec.experts)  # the table's MoE families


def _ours(folder, family, load_in_4bit=False, use_kernels=True):
    model, _ = FastLanguageModel.from_pretrained(
        str(folder), max_seq_length=64, dtype=torch.float32, load_in_4bit=load_in_4bit,
        attn_implementation=get_family(family).attn_implementation, use_kernels=use_kernels)
    _no_cpu_repack(model)
    return model


def _no_cpu_repack(model):
    """bitsandbytes' CPU repack off, as tuneforge's loader does (an eval forward on an AVX512-BF16
    CPU would otherwise round the attention's block scales to bf16; see integration/bnb.py)."""
    import bitsandbytes as bnb

    for layer in model.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.support_avx512bf16_for_cpu = False


def _reference(folder, family, load_in_4bit=False):
    kwargs = {}
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu",
                                                 attn_implementation=get_family(family).attn_implementation, **kwargs)
    if load_in_4bit:
        _no_cpu_repack(model)
        assert nf4_round_trip_experts(model, family) == 4
    return model.eval()


def _logits(model):
    ids, mask, _ = tiny_batch()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _lora_ours(model):
    ours = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False,
                                            random_state=3407, use_kernels=True)
    randomize_lora_b(ours)
    return ours


def _lora_reference(model, family):
    spec = get_family(family)
    torch.manual_seed(3407)
    reference = peft.get_peft_model(model, peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(spec.lora_targets),
        target_parameters=list(spec.experts), task_type="CAUSAL_LM"))
    randomize_lora_b(reference)
    return reference


def _step(model, **kwargs):
    ids, mask, labels = tiny_batch(seed=2)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **kwargs)
    out.loss.backward()
    return out


def _assert_same_step(ours, reference, family, expected_experts_calls=None):
    calls = []
    apply = moe_kernel.MoEExperts.apply
    moe_kernel.MoEExperts.apply = lambda *a: calls.append(1) or apply(*a)
    try:
        loss = _step(ours).loss
    finally:
        moe_kernel.MoEExperts.apply = apply
    expected = _step(reference).loss
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    grads, expected_grads = lora_grads(ours), lora_grads(reference)
    spec = get_family(family)
    # A and B on each attention projection and on each stacked expert weight, in both layers.
    assert grads.keys() == expected_grads.keys()
    assert len(grads) == 2 * 2 * (len(spec.lora_targets) + len(spec.experts))
    for name, grad in expected_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # The experts of both layers ran through kernels.moe, not peft's W + s B A.
    assert len(calls) == (expected_experts_calls if expected_experts_calls is not None else 2)


# --- loading ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_16bit_load_equals_transformers(family, folders):
    ours = _ours(folders(family), family)
    assert ours.tuneforge.family is get_family(family) and not any(is_nf4(m) for m in ours.modules())
    torch.testing.assert_close(_logits(ours), _logits(_reference(folders(family), family)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_4bit_load_stores_experts_as_nf4(family, folders):
    import bitsandbytes as bnb

    ours = _ours(folders(family), family, load_in_4bit=True)
    spec = get_family(family)
    experts = experts_modules(ours, spec)
    assert len(experts) == 2 and all(is_nf4(m) for _, m in experts)
    for _, module in experts:
        for name in spec.experts:
            state = module._tuneforge_nf4[name]
            assert state.quant_type == "nf4" and state.nested and state.blocksize == 64
            assert getattr(module, f"{name}_nf4").dtype == torch.uint8
            stand_in = getattr(module, name)  # no dense copy: one NaN broadcast over the shape
            assert stand_in.shape == state.shape and stand_in.untyped_storage().nbytes() == 4
    attention = [m for n, m in ours.named_modules() if n.rsplit(".", 1)[-1] in spec.lora_targets]
    assert attention and all(isinstance(m, bnb.nn.Linear4bit) for m in attention)
    # No float tensor of the model is an expert-sized weight any more.
    stacked = min(p.numel() for _, m in experts for p in (m._tuneforge_nf4[n] for n in spec.experts)
                  for p in [torch.empty(p.shape, device="meta")])
    dense = [n for n, t in [*ours.named_parameters(), *ours.named_buffers()]
             if t.is_floating_point() and t.numel() >= stacked and t.untyped_storage().nbytes() > 4 and "embed" not in n
             and "lm_head" not in n]
    assert not dense, dense
    torch.testing.assert_close(_logits(ours), _logits(_reference(folders(family), family, load_in_4bit=True)),
                               rtol=1e-5, atol=1e-5)


# --- LoRA --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_step_equals_peft_and_adapter_reloads_with_plain_peft(family, folders, tmp_path):
    ours = _lora_ours(_ours(folders(family), family))
    assert "moe_lora" in ours.get_base_model().tuneforge.lora_kernels
    reference = _lora_reference(_reference(folders(family), family), family)
    _assert_same_step(ours, reference, family)

    ours.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(_reference(folders(family), family), tmp_path)
    torch.testing.assert_close(_logits(reloaded), _logits(reference), rtol=0, atol=0)
    torch.testing.assert_close(_logits(ours), _logits(reference), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_qlora_step_equals_peft_on_the_dequantised_reference(family, folders):
    ours = _lora_ours(_ours(folders(family), family, load_in_4bit=True))
    reference = _lora_reference(_reference(folders(family), family, load_in_4bit=True), family)
    _assert_same_step(ours, reference, family)


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_peft_on_nf4_experts_equals_the_fused_path(family, folders):
    # Kernels off: peft's ParamWrapper parametrizes the stand-in; the NF4 experts forward applies
    # that W + s B A to the dequantised weights, as peft does on a 16-bit model.
    fused = _lora_ours(_ours(folders(family), family, load_in_4bit=True))
    plain_base = _ours(folders(family), family, load_in_4bit=True, use_kernels=False)
    plain = FastLanguageModel.get_peft_model(plain_base, r=8, lora_alpha=16, use_gradient_checkpointing=False,
                                             random_state=3407, use_kernels=False)
    randomize_lora_b(plain)
    assert "moe_lora" not in plain.get_base_model().tuneforge.lora_kernels
    _assert_same_step(plain, fused, family, expected_experts_calls=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_router_aux_loss_as_transformers(family, folders):
    ours = _ours(folders(family), family)
    assert "fused_cross_entropy" in ours.tuneforge.kernels
    reference = _reference(folders(family), family)
    got = _step(ours, output_router_logits=True)
    want = _step(reference, output_router_logits=True)
    assert got.aux_loss is not None and got.logits is None
    torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    # The config switch too (router_aux_loss_coef times the aux loss is in the loss).
    ours.config.output_router_logits = reference.config.output_router_logits = True
    torch.testing.assert_close(_step(ours).loss, _step(reference).loss, rtol=1e-5, atol=1e-6)


# --- generation, packing, training, merging ---------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_equals_transformers(family, folders):
    prompt = tiny_batch(batch=1, seq=5, pad=0)[0]
    ours = FastLanguageModel.for_inference(_ours(folders(family), family))
    got = ours.generate(input_ids=prompt, max_new_tokens=3, do_sample=False)
    want = _reference(folders(family), family).generate(input_ids=prompt, max_new_tokens=3, do_sample=False)
    assert got.shape == (1, 8) and torch.equal(got, want)


@pytest.mark.parametrize("family", [f for f in FAMILIES if get_family(f).packing])
def test_packed_row_loss_equals_samples_one_by_one(family, folders):
    ours, reference = _ours(folders(family), family), _reference(folders(family), family)
    ids, _, _ = tiny_batch(batch=2, seq=6, pad=0, seed=5)
    labels = ids.clone()
    labels[:, 0] = -100
    packed = ours(input_ids=ids.reshape(1, -1), labels=labels.reshape(1, -1),
                  position_ids=torch.arange(6).repeat(2)[None], use_cache=False).loss
    alone = sum(reference(input_ids=row[None], labels=row[None]).loss for row in ids) / 2
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_qlora_training_lowers_the_loss_and_leaves_nf4_alone(family, folders):
    ours = _lora_ours(_ours(folders(family), family, load_in_4bit=True))
    frozen = {name: b.clone() for name, b in ours.named_buffers() if name.endswith("_nf4")}
    assert frozen
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        losses.append(_step(ours).loss.item())
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(torch.equal(b, frozen[name]) for name, b in ours.named_buffers() if name.endswith("_nf4"))


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_adapter_equals_the_adapter(family, folders):
    # peft's ParamWrapper merges W + s B A into the stacked weights; the fused forward is unhooked.
    ours = _lora_ours(_ours(folders(family), family))
    want = _logits(ours)
    merged = ours.merge_and_unload()
    torch.testing.assert_close(_logits(merged), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_dequantised_experts_compute_what_nf4_experts_do(family, folders):
    # Before a merge or an export of a 4-bit model: the experts become dense parameters holding
    # exactly the NF4 values, and transformers' own experts forward runs again.
    from tuneforge.models.moe import dequantize_experts

    ours = _lora_ours(_ours(folders(family), family, load_in_4bit=True))
    want = _logits(ours)
    assert dequantize_experts(ours.get_base_model()) == 4
    assert not any(is_nf4(m) for m in ours.modules())
    assert all(torch.isfinite(p).all() for p in ours.parameters() if p.is_floating_point())
    torch.testing.assert_close(_logits(ours), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_4bit_generation_equals_the_reference(family, folders):
    prompt = tiny_batch(batch=1, seq=5, pad=0)[0]
    ours = FastLanguageModel.for_inference(_ours(folders(family), family, load_in_4bit=True))
    got = ours.generate(input_ids=prompt, max_new_tokens=3, do_sample=False)
    reference = _reference(folders(family), family, load_in_4bit=True)
    want = reference.generate(input_ids=prompt, max_new_tokens=3, do_sample=False)
    assert got.shape == (1, 8) and torch.equal(got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_4bit_adapter_folder_reloads_through_from_pretrained(family, folders, tmp_path):
    # FastLanguageModel.from_pretrained on the saved adapter: base in 4-bit (NF4 experts again),
    # the adapter on the experts through peft's target_parameters, routed through kernels.moe.
    ours = _lora_ours(_ours(folders(family), family, load_in_4bit=True))
    want = _logits(ours)
    ours.save_pretrained(tmp_path)
    reloaded, _ = FastLanguageModel.from_pretrained(str(tmp_path), max_seq_length=64, dtype=torch.float32,
                                                    load_in_4bit=True, use_kernels=True,
                                                    attn_implementation=get_family(family).attn_implementation)
    _no_cpu_repack(reloaded)
    base = reloaded.get_base_model()
    assert all(is_nf4(m) for _, m in experts_modules(base, get_family(family)))
    assert "moe_lora" in base.tuneforge.lora_kernels
    torch.testing.assert_close(_logits(reloaded.eval()), want, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_sft_trainer_qlora_on_experts_lowers_the_loss(family, tmp_path):
    # End to end as the notebooks: 4-bit load, LoRA on attention and experts with offloaded
    # checkpointing, tuneforge's SFTTrainer on text rows (packed where the family packs).
    from datasets import Dataset
    from tiny_chat_model import tiny_tokenizer

    from tuneforge import SFTConfig, SFTTrainer

    tokenizer = tiny_tokenizer()
    folder = tmp_path / "model"
    tiny_model(family, vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # The CPU's default load (no Triton kernels: the interpreter would take minutes); the experts'
    # LoRA through kernels.moe all the same (PyTorch on the CPU), asked for in get_peft_model.
    model, tokenizer = FastLanguageModel.from_pretrained(str(folder), max_seq_length=64, dtype=torch.float32,
                                                         load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing="unsloth",
                                             use_kernels=True)
    calls = []
    apply = moe_kernel.MoEExperts.apply
    moe_kernel.MoEExperts.apply = lambda *a: calls.append(1) or apply(*a)
    rows = Dataset.from_list([{"text": f"Row {i % 3}: the experts learn this short line."} for i in range(12)])
    try:
        trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=rows, args=SFTConfig(
            output_dir=str(tmp_path / "run"), max_steps=8, per_device_train_batch_size=4, learning_rate=1e-2,
            dataset_text_field="text", packing=get_family(family).packing, logging_steps=1, report_to=[],
            save_strategy="no"))
        trainer.train()
    finally:
        moe_kernel.MoEExperts.apply = apply
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8 and losses[-1] < 0.9 * losses[0], losses
    assert calls  # the experts trained through kernels.moe


def test_4bit_load_quantises_each_stack_as_it_arrives(folders, monkeypatch):
    # The dense experts never exist all at once: each stack becomes NF4 when transformers sets it
    # (models.moe.quantizing_class), before from_pretrained returns; quantize_experts then only
    # hands the modules their own class and forward back.
    import tuneforge.models.moe as moe

    events = []
    store, finish = moe._store_nf4, moe.quantize_experts
    monkeypatch.setattr(moe, "_store_nf4", lambda *a, **k: events.append("store") or store(*a, **k))
    monkeypatch.setattr(moe, "quantize_experts", lambda *a, **k: events.append("finish") or finish(*a, **k))
    ours = _ours(folders("qwen3_moe"), "qwen3_moe", load_in_4bit=True)
    assert events == ["store"] * 4 + ["finish"]
    experts = [m for _, m in experts_modules(ours, get_family("qwen3_moe"))]
    assert all(type(m).__name__ == "Qwen3MoeExperts" and type(m) not in moe._LOADING_BASES for m in experts)
    assert type(ours).__bases__[0].__name__ != "Qwen3MoeForCausalLM"  # the family's own class, not the loading one


ROUTERS = {"qwen3_moe": "mlp.gate.weight", "mixtral": "mlp.gate.weight", "gpt_oss": "mlp.router.weight"}


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_on_the_router_too_equals_peft(family, folders):
    # The router (optional): peft's ParamWrapper on its [experts, hidden] weight, left to peft's
    # own forward; the experts still through kernels.moe.
    spec = get_family(family)
    targets = [*spec.experts, ROUTERS[family]]
    ours = FastLanguageModel.get_peft_model(_ours(folders(family), family), r=8, lora_alpha=16,
                                            use_gradient_checkpointing=False, random_state=3407,
                                            use_kernels=True, target_parameters=targets)
    randomize_lora_b(ours)
    torch.manual_seed(3407)
    reference = peft.get_peft_model(_reference(folders(family), family), peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=list(spec.lora_targets), target_parameters=targets, task_type="CAUSAL_LM"))
    randomize_lora_b(reference)
    loss, expected = _step(ours).loss, _step(reference).loss
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    grads, expected_grads = lora_grads(ours), lora_grads(reference)
    assert grads.keys() == expected_grads.keys() and len(grads) == 2 * 2 * (len(spec.lora_targets) + 3)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_target_parameters_that_match_nothing_say_so(folders):
    from tuneforge.lora.inject import LoRAConfigError

    with pytest.raises(LoRAConfigError, match=r"match no parameter.*stacked expert parameters are \['down_proj', 'gate_up_proj'\]"):
        FastLanguageModel.get_peft_model(_ours(folders("mixtral"), "mixtral"), target_parameters=["w1"])
    with pytest.raises(LoRAConfigError, match="lora_dropout"):
        FastLanguageModel.get_peft_model(_ours(folders("mixtral"), "mixtral"), lora_dropout=0.1)


@pytest.mark.parametrize("bits", [16, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_merged_export_carries_the_experts_and_their_lora(family, bits, folders, tmp_path):
    # save_pretrained_merged reads the NF4 experts (not their NaN stand-ins) and adds peft's
    # ParamWrapper delta to each stack, as peft's own merge would.
    from peft.tuners.lora.layer import ParamWrapper
    from safetensors.torch import load_file

    from tuneforge.kernels.moe import dequantize_stack

    ours = _lora_ours(_ours(folders(family), family, load_in_4bit=bits == 4))
    ours.save_pretrained_merged(str(tmp_path), None, save_method="merged_16bit")
    merged = load_file(str(tmp_path / "model.safetensors"))
    checked = 0
    for name, wrapper in ours.get_base_model().named_modules():
        if not isinstance(wrapper, ParamWrapper):
            continue
        experts = wrapper.get_base_layer()
        parameter = wrapper.parameter_name
        states = getattr(experts, "_tuneforge_nf4", {})
        base = (dequantize_stack(getattr(experts, f"{parameter}_nf4"), states[parameter], torch.float32)
                if parameter in states else getattr(experts, parameter).detach().float())
        want = base + wrapper.get_delta_weight("default").float()
        key = name.replace(".base_layer", "") + "." + parameter
        got = merged[key]
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), want.to(got.dtype).float(), rtol=0, atol=0, msg=key)
        checked += 1
    assert checked == 4


def test_merging_a_moe_adapter_folder_says_how(folders, tmp_path):
    # The files alone do not say which nested ParamWrapper holds which stack; the built model does.
    from tuneforge.export.merge import merge_adapter_folder

    _lora_ours(_ours(folders("qwen3_moe"), "qwen3_moe")).save_pretrained(tmp_path / "adapter")
    with pytest.raises(NotImplementedError, match="FastLanguageModel.from_pretrained.*save_pretrained_merged"):
        merge_adapter_folder(tmp_path / "adapter", tmp_path / "merged")
