"""FastLanguageModel on an adapter folder (Unsloth's `from_pretrained(model_name="lora_model")`) and
FastModel's finetune_* switches."""

import json

import pytest
import torch

from tuneforge import FastModel
from tuneforge.fast_language_model import FastLanguageModel
from tuneforge.models.loader import ModelLoadError
from tuneforge.testing import tiny_model
from tuneforge.testing.tiny import randomize_lora_b

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS.to(model.device)).logits.float().cpu()


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-base")
    # intermediate 192, not the tiny default 176: bitsandbytes' CPU NF4 kernel repacks weights in blocks
    # of 32 output features when a model runs without gradients (what this file is about is the reload).
    tiny_model("llama", seed=0, intermediate_size=192).save_pretrained(folder)
    return folder


def _trained(base_folder, four_bit: bool):
    model, _ = FastLanguageModel.from_pretrained(str(base_folder), load_in_4bit=four_bit, max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    randomize_lora_b(model, std=0.3)  # a nonzero adapter, so that reloading it matters
    return model


@pytest.mark.parametrize("four_bit", [False, True], ids=["16-bit", "nf4"])
def test_lora_model_folder_reloads_with_the_logits_of_the_model_that_saved_it(base_folder, tmp_path, four_bit):
    model = _trained(base_folder, four_bit)
    saved = _logits(model.eval())
    model.save_pretrained(tmp_path / "lora_model")

    reloaded, _ = FastLanguageModel.from_pretrained(model_name=str(tmp_path / "lora_model"), load_in_4bit=four_bit,
                                                    max_seq_length=64)
    again = _logits(reloaded.eval())
    assert torch.equal(again, saved), (again - saved).abs().max()
    with reloaded.disable_adapter():
        assert not torch.equal(again, _logits(reloaded)), "the adapter changes nothing"
    quantised = [m for m in reloaded.modules() if type(m).__name__ == "Linear4bit"]
    assert bool(quantised) == four_bit
    for name in ("save_pretrained_merged", "save_pretrained_gguf", "push_to_hub_merged", "push_to_hub_gguf"):
        assert callable(getattr(reloaded, name))


def test_reloaded_adapter_is_trainable_by_default_and_frozen_on_request(base_folder, tmp_path):
    _trained(base_folder, four_bit=False).save_pretrained(tmp_path / "lora_model")
    trainable, _ = FastLanguageModel.from_pretrained(str(tmp_path / "lora_model"), load_in_4bit=False,
                                                     max_seq_length=64)
    names = [n for n, p in trainable.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    frozen, _ = FastLanguageModel.from_pretrained(str(tmp_path / "lora_model"), load_in_4bit=False,
                                                  max_seq_length=64, is_trainable=False)
    assert not any(p.requires_grad for p in frozen.parameters())
    FastLanguageModel.for_inference(frozen)
    out = frozen.generate(IDS, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, IDS.shape[1] + 3)


def test_run_folder_and_merged_export_of_a_reloaded_adapter(base_folder, tmp_path):
    model = _trained(base_folder, four_bit=False)
    saved = _logits(model.eval())
    model.save_pretrained(tmp_path / "run" / "adapter")  # what `tuneforge train` leaves
    reloaded, _ = FastLanguageModel.from_pretrained(str(tmp_path / "run"), load_in_4bit=False, max_seq_length=64)
    reloaded.save_pretrained_merged(str(tmp_path / "merged"), None, save_method="merged_16bit", dtype="float32")
    merged, _ = FastLanguageModel.from_pretrained(str(tmp_path / "merged"), load_in_4bit=False, max_seq_length=64,
                                                  dtype=torch.float32)
    torch.testing.assert_close(_logits(merged), saved, rtol=1e-4, atol=1e-4)


def test_adapter_folder_errors(base_folder, tmp_path):
    folder = tmp_path / "lora_model"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ModelLoadError, match="names no base_model_name_or_path"):
        FastLanguageModel.from_pretrained(str(folder))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA",
                                                            "base_model_name_or_path": str(base_folder)}))
    with pytest.raises(ValueError, match="full_finetuning=True needs a full model"):
        FastLanguageModel.from_pretrained(str(folder), full_finetuning=True)


@pytest.mark.parametrize("attention, mlp, expected", [
    (True, False, {"q_proj", "k_proj", "v_proj", "o_proj"}),
    (False, True, {"gate_proj", "up_proj", "down_proj"}),
])
def test_fast_model_chooses_attention_or_mlp_projections(base_folder, attention, mlp, expected):
    model, _ = FastModel.from_pretrained(str(base_folder), load_in_4bit=False, max_seq_length=64)
    model = FastModel.get_peft_model(model, finetune_vision_layers=False, finetune_language_layers=True,
                                     finetune_attention_modules=attention, finetune_mlp_modules=mlp, r=4,
                                     use_gradient_checkpointing=False)
    assert set(model.peft_config["default"].target_modules) == expected


def test_fast_model_refuses_what_it_cannot_honour(base_folder):
    model, _ = FastModel.from_pretrained(str(base_folder), load_in_4bit=False, max_seq_length=64)
    with pytest.raises(NotImplementedError, match="text models only"):
        FastModel.get_peft_model(model, finetune_vision_layers=True)
    with pytest.raises(ValueError, match="leave nothing to train"):
        FastModel.get_peft_model(model, finetune_attention_modules=False, finetune_mlp_modules=False)
    with pytest.raises(ValueError, match="either target_modules"):
        FastModel.get_peft_model(model, target_modules=["q_proj"], finetune_mlp_modules=False)


def test_get_peft_model_on_a_reloaded_adapter_passes_it_through_or_says_what_differs(base_folder, tmp_path, caplog):
    _trained(base_folder, four_bit=False).save_pretrained(tmp_path / "lora_model")
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "lora_model"), load_in_4bit=False, max_seq_length=64)
    with caplog.at_level("WARNING", logger="tuneforge.fast_language_model"):
        same = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    assert same is model and "already has this LoRA adapter" in caplog.text
    with pytest.raises(ValueError, match=r"r=16 \(the adapter has 4\)"):
        FastLanguageModel.get_peft_model(model, r=16, lora_alpha=8)
