"""bitsandbytes' CPU repack, forced so that any CPU proves tuneforge never reads a repacked weight.

On a CPU with AVX512-BF16, bitsandbytes' Linear4bit rewrites its weight in place the first time it
runs in eval mode on an input without grad (see tuneforge.integration.bnb). These tests make that
happen on any CPU: tuneforge's reading of bitsandbytes' feature flag (`cpu_repacks`) is
monkeypatched to True, and the layers are converted by bitsandbytes' own function
(`force_cpu_repack`) instead of a forward (on a CPU without the feature bitsandbytes has no kernel
that multiplies by a repacked weight). Each export, and a training step, is then compared with the
same on a twin that was never repacked: bit for bit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tuneforge.integration import bnb as glue

sys.path.insert(0, str(Path(__file__).parents[1] / "export"))
from export_helpers import ALL_LINEAR, perturb_lora  # noqa: E402


@pytest.fixture
def repack_anywhere(monkeypatch):
    import bitsandbytes.functional as bnbf

    if not hasattr(bnbf, "_convert_weight_packed_for_cpu"):
        pytest.skip("this bitsandbytes has no CPU repack")
    monkeypatch.setattr(glue, "cpu_repacks", lambda: True)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny Llama whose every projection bitsandbytes can repack (rows multiple of 32, columns of 64)."""
    from tuneforge.testing import tiny_model

    folder = tmp_path_factory.mktemp("tiny-repackable")
    # The vocabulary of SmolLM2's tokenizer, which the GGUF export writes.
    tiny_model("llama", seed=0, intermediate_size=128, vocab_size=49152).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def qlora(folder, **load):
    """The notebook's model: NF4 base through tuneforge's loader, LoRA on every projection, non-zero B."""
    from tuneforge import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(str(folder), load_in_4bit=True, dtype=torch.float32,
                                                 max_seq_length=64, **load)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=ALL_LINEAR,
                                             use_gradient_checkpointing=False)
    perturb_lora(model)
    return model


def repacked(folder, **load):
    """qlora(folder) after for_inference and the repack a generate would do on an AVX512-BF16 CPU."""
    from tuneforge import FastLanguageModel

    model = qlora(folder, **load)
    FastLanguageModel.for_inference(model)
    assert glue.force_cpu_repack(model) == 14  # 7 projections x 2 layers
    return model


def files_equal(a: Path, b: Path, pattern: str) -> None:
    from safetensors.torch import load_file

    names = sorted(p.name for p in a.glob(pattern))
    assert names and names == sorted(p.name for p in b.glob(pattern))
    for name in names:
        if name.endswith(".safetensors"):
            left, right = load_file(a / name), load_file(b / name)
            assert left.keys() == right.keys()
            for key in left:
                assert torch.equal(left[key], right[key]), key
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("save_method", ["merged_16bit", "merged_4bit"])
def test_merge_after_repack_equals_merge_without(repack_anywhere, tiny_folder, tmp_path, save_method):
    qlora(tiny_folder).save_pretrained_merged(tmp_path / "plain", save_method=save_method)
    repacked(tiny_folder).save_pretrained_merged(tmp_path / "repacked", save_method=save_method)
    files_equal(tmp_path / "plain", tmp_path / "repacked", "*.safetensors")


def test_gguf_after_repack_equals_gguf_without(repack_anywhere, tiny_folder, tokenizer, tmp_path):
    # The same folder name: the file's metadata carries it.
    (plain,) = qlora(tiny_folder).save_pretrained_gguf(tmp_path / "plain" / "m", tokenizer, "f16", modelfile=False)
    (packed,) = repacked(tiny_folder).save_pretrained_gguf(tmp_path / "repacked" / "m", tokenizer, "f16",
                                                            modelfile=False)
    assert plain.read_bytes() == packed.read_bytes()


def test_adapter_save_after_repack_leaves_the_base_as_loaded(repack_anywhere, tiny_folder, tmp_path):
    plain, model = qlora(tiny_folder), repacked(tiny_folder)
    plain.save_pretrained_merged(tmp_path / "plain", save_method="lora")
    model.save_pretrained_merged(tmp_path / "repacked", save_method="lora")
    files_equal(tmp_path / "plain", tmp_path / "repacked", "adapter_model.safetensors")
    # peft's state_dict() runs bitsandbytes' own (lossy) unpacking if the weight is still repacked:
    # the base must come out of the save exactly as loaded.
    for (name, a), (_, b) in zip(plain.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name


def test_peft_save_pretrained_after_repack_then_merge_is_exact(repack_anywhere, tiny_folder, tmp_path):
    """The notebook calls peft's model.save_pretrained directly: bitsandbytes unpacks there, itself."""
    plain, model = qlora(tiny_folder), repacked(tiny_folder)
    model.save_pretrained(tmp_path / "adapter")
    plain.save_pretrained_merged(tmp_path / "plain", save_method="merged_16bit")
    model.save_pretrained_merged(tmp_path / "repacked", save_method="merged_16bit")
    files_equal(tmp_path / "plain", tmp_path / "repacked", "*.safetensors")


def tiny_batch_of(model):
    from tuneforge.testing.tiny import tiny_batch

    input_ids, attention_mask, labels = tiny_batch(batch=2, seq=12)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def train_step(model):
    """One forward/backward in train mode; (loss, {LoRA name: grad})."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**tiny_batch_of(model)).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("back_to_training, use_kernels", [("for_training", False), ("for_training", True),
                                                             ("train()", True)])
def test_training_step_after_repack_equals_one_without(repack_anywhere, tiny_folder, back_to_training, use_kernels):
    from tuneforge import FastLanguageModel

    plain = qlora(tiny_folder, use_kernels=use_kernels)
    model = repacked(tiny_folder, use_kernels=use_kernels)
    if back_to_training == "for_training":
        FastLanguageModel.for_training(model)  # the notebook's way back
    # else: straight to model.train(): the fused LoRA kernels read the base weight themselves.
    # (Without kernels bitsandbytes' own forward would multiply by its repacked weight, in bf16.)
    loss, grads = train_step(model)
    want_loss, want_grads = train_step(plain)
    assert torch.equal(loss, want_loss)
    assert grads.keys() == want_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], want_grads[name]), name


def test_trainer_puts_the_standard_layout_back(repack_anywhere, tiny_folder, tokenizer, tmp_path):
    from datasets import Dataset

    from tuneforge.train.trainer import SFTConfig, SFTTrainer

    model = repacked(tiny_folder)
    data = Dataset.from_dict({"input_ids": [[5, 6, 7, 8]] * 2})
    SFTTrainer(model=model, train_dataset=data, processing_class=tokenizer,
               args=SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to=[]))
    states = [layer.weight.quant_state for layer in glue.linear4bit_layers(model)]
    assert states and not any(glue.is_repacked(s) for s in states)
    assert not any(layer.support_avx512bf16_for_cpu for layer in glue.linear4bit_layers(model))


def test_our_dequantisation_refuses_a_repacked_weight(repack_anywhere, tiny_folder):
    """A bare (data, quant_state) pair cannot be restored in place: a clear error, never garbage."""
    from tuneforge.kernels.nf4 import dequantize_nf4, reference_dequantize_nf4

    layer = glue.linear4bit_layers(repacked(tiny_folder))[0]
    for dequantize in (dequantize_nf4, reference_dequantize_nf4):
        with pytest.raises(ValueError, match="CPU-repacked layout"):
            dequantize(layer.weight.data, layer.weight.quant_state)


@pytest.mark.skipif(not glue.cpu_repacks(), reason="needs a CPU on which bitsandbytes repacks (AVX512-BF16)")
def test_a_real_eval_forward_repacks_and_is_undone_exactly(tiny_folder, tmp_path):
    """On this CPU bitsandbytes' own forward repacks (no forcing); the export still equals the plain one."""
    model = qlora(tiny_folder)
    from tuneforge import FastLanguageModel

    FastLanguageModel.for_inference(model)
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]))
    assert any(glue.is_repacked(layer.weight.quant_state) for layer in glue.linear4bit_layers(model))
    model.save_pretrained_merged(tmp_path / "repacked", save_method="merged_16bit")
    qlora(tiny_folder).save_pretrained_merged(tmp_path / "plain", save_method="merged_16bit")
    files_equal(tmp_path / "plain", tmp_path / "repacked", "*.safetensors")


def test_loading_never_lets_bitsandbytes_repack(tiny_folder):
    model = qlora(tiny_folder)
    layers = glue.linear4bit_layers(model)
    assert layers and not any(layer.support_avx512bf16_for_cpu for layer in layers)
    with torch.no_grad():
        model.eval()(input_ids=torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]))
    assert not any(glue.is_repacked(layer.weight.quant_state) for layer in layers)


# --- bitsandbytes' CPU dequantisation of rows that are not whole blocks ----------------------------


@pytest.mark.parametrize("shape", [(64, 176), (96, 80), (64, 128), (33, 70)])
def test_dequantize_4bit_equals_the_nf4_formula_for_any_shape(shape):
    """bitsandbytes' AVX512 CPU kernel is wrong for 64 x 176 and 96 x 80; ours must not be."""
    import bitsandbytes.functional as bnbf

    from tuneforge.kernels.nf4 import reference_dequantize_nf4

    weight = torch.randn(shape)
    for nested in (False, True):
        packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=nested, quant_type="nf4")
        assert torch.equal(glue.dequantize_4bit(packed, state), reference_dequantize_nf4(packed, state))


def test_a_layer_bitsandbytes_would_dequantise_wrongly_forwards_by_the_formula(monkeypatch, tmp_path):
    """The tiny default Llama's down_proj takes 176 inputs (not whole blocks of 64): on a CPU whose
    bitsandbytes kernel gets that wrong, tuneforge's forward equals the NF4 formula instead."""
    from tuneforge import FastLanguageModel
    from tuneforge.kernels.nf4 import reference_dequantize_nf4
    from tuneforge.testing import tiny_model

    monkeypatch.setattr(glue, "cpu_dequantize_exact", lambda: False)  # as on an AVX512 CPU
    tiny_model("llama", seed=0).save_pretrained(tmp_path)
    for use_kernels in (False, True):
        model, _ = FastLanguageModel.from_pretrained(str(tmp_path), load_in_4bit=True, dtype=torch.float32,
                                                     max_seq_length=64, use_kernels=use_kernels)
        down = model.model.layers[0].mlp.down_proj
        x = torch.randn(3, 20, 176)
        want = x @ reference_dequantize_nf4(down.weight.data, down.weight.quant_state).t()
        torch.testing.assert_close(down(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not glue.cpu_repacks(), reason="needs a CPU on which bitsandbytes repacks (AVX512-BF16)")
def test_exact_forwards_compute_the_loaded_function_then_allow_the_repack_again(tiny_folder):
    """export.verify's reference: after for_inference, forwards inside exact_forwards equal the
    never-repacked model's; afterwards the faster repacked path is back."""
    from tuneforge import FastLanguageModel

    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
    plain, model = qlora(tiny_folder).eval(), qlora(tiny_folder)
    FastLanguageModel.for_inference(model)
    with torch.no_grad():
        model(input_ids=ids)  # repacks
        with glue.exact_forwards(model):
            assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)
        model(input_ids=ids)
    assert all(glue.is_repacked(layer.weight.quant_state) for layer in glue.linear4bit_layers(model))


def test_get_peft_model_on_a_plain_transformers_nf4_model_stops_the_repack(tiny_folder):
    # A model that never went through tuneforge's loader (plain transformers + bitsandbytes) still
    # gets the no-repack policy from get_peft_model; without it bitsandbytes would repack here.
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tuneforge import FastLanguageModel

    plain = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    layers = glue.linear4bit_layers(plain)
    # On a CPU with AVX512-BF16 (this machine's kind) bitsandbytes arms the repack at load.
    assert layers and (not glue.cpu_repacks() or all(layer.support_avx512bf16_for_cpu for layer in layers))
    model = FastLanguageModel.get_peft_model(plain, r=4, target_modules=ALL_LINEAR, use_gradient_checkpointing=False)
    assert not any(layer.support_avx512bf16_for_cpu for layer in glue.linear4bit_layers(model))
