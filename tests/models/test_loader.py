"""from_pretrained: name resolution, quantisation, tokenizer fixes, RoPE scaling, clear errors."""

import pytest
import torch

from tuneforge import FastLanguageModel
from tuneforge.models.loader import ModelLoadError, apply_rope_scaling, fix_tokenizer, resolve_dtype
from tuneforge.models.registry import resolve_name
from tuneforge.testing import tiny_config


def test_tiny_llama_loads_in_4bit_with_nf4_double_quant(tiny_llama_dir):
    import bitsandbytes as bnb

    model, _ = _load_tiny(tiny_llama_dir, load_in_4bit=True)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    state = q_proj.weight.quant_state
    assert state.quant_type == "nf4" and state.nested, "NF4 with double-quantised absmax expected"
    # CPU: the compute dtype is fp32 (bf16 NF4 matmuls run ~20x slower on the CPU).
    assert q_proj.compute_dtype == torch.float32
    assert model.max_seq_length == 128


def test_16bit_load_keeps_dense_weights(tiny_llama_dir):
    model, _ = _load_tiny(tiny_llama_dir, load_in_4bit=False, dtype="bfloat16")
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_missing_local_path_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="model path not found: ./no/such/model"):
        FastLanguageModel.from_pretrained("./no/such/model")


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="could not load 'someone/not-a-model'.*HF_HUB_OFFLINE"):
        FastLanguageModel.from_pretrained("someone/not-a-model")


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        FastLanguageModel.from_pretrained(str(tmp_path))


def test_fast_inference_is_refused_not_ignored():
    with pytest.raises(NotImplementedError, match="vLLM"):
        FastLanguageModel.from_pretrained("anything", fast_inference=True)


def test_registry_maps_to_4bit_twin_and_back():
    assert resolve_name("meta-llama/Llama-3.1-8B-Instruct", True) == "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit"
    assert resolve_name("unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit", False) == "meta-llama/Llama-3.1-8B-Instruct"
    assert resolve_name("someone/unknown", True) == "someone/unknown"


def test_dtype_auto_is_fp32_on_cpu():
    assert resolve_dtype(None) == torch.float32
    assert resolve_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_dtype("float8")


def test_rope_linear_scaling_when_longer_than_trained():
    config = tiny_config("llama", max_position_embeddings=512)
    apply_rope_scaling(config, 1300, None)
    assert config.rope_parameters["rope_type"] == "linear"
    assert config.rope_parameters["factor"] == 3.0
    assert config.max_position_embeddings == 1300


def test_rope_scaling_left_alone_within_trained_length():
    config = tiny_config("llama", max_position_embeddings=512)
    apply_rope_scaling(config, 256, None)
    assert config.rope_parameters.get("rope_type", "default") == "default"


def test_rope_scaled_model_runs_beyond_trained_length(tiny_llama_dir):
    model, _ = _load_tiny(tiny_llama_dir, load_in_4bit=False, max_seq_length=1100)
    assert model.config.rope_parameters["rope_type"] == "linear"
    with torch.no_grad():
        logits = model(torch.randint(0, 317, (1, 1100))).logits
    assert torch.isfinite(logits).all()


def test_pad_token_is_never_eos(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.pad_token == tokenizer.eos_token  # the shipped tokenizer pads with EOS
    fix_tokenizer(tokenizer)
    assert tokenizer.pad_token != tokenizer.eos_token
    assert tokenizer.padding_side == "right"


def test_smollm2_answers_sensibly_before_training(smollm2_dir):
    from tuneforge.fast_language_model import generate_text

    model, tokenizer = FastLanguageModel.from_pretrained("tuneforge/smollm2-135m-instruct", max_seq_length=256)
    answer = generate_text(model, tokenizer, [{"role": "user", "content": "What is the capital of France?"}],
                           max_new_tokens=12)
    assert "Paris" in answer


def _load_tiny(folder, load_in_4bit, max_seq_length=128, dtype=None):
    from transformers import AutoTokenizer

    from tuneforge.models.shipped import smollm2_path

    # The tiny model has no tokenizer of its own; SmolLM2's is copied beside it.
    if not (folder / "tokenizer.json").exists():
        AutoTokenizer.from_pretrained(smollm2_path()).save_pretrained(folder)
    return FastLanguageModel.from_pretrained(str(folder), max_seq_length=max_seq_length,
                                             load_in_4bit=load_in_4bit, dtype=dtype)


def test_folder_without_tokenizer_loads_with_tokenizer_none(tmp_path, caplog):
    from tuneforge.testing import tiny_model

    tiny_model("llama").save_pretrained(tmp_path)
    with caplog.at_level("WARNING"):
        model, tokenizer = FastLanguageModel.from_pretrained(str(tmp_path), max_seq_length=64, load_in_4bit=False)
    assert tokenizer is None and model is not None
    assert "no tokenizer files" in caplog.text


def test_falcon_4bit_is_its_own_class_and_a_saved_4bit_checkpoint_reloads(tmp_path, caplog):
    # Falcon's FalconLinear layers are built as nn.Linear for the quantiser (loader._with_plain_linears);
    # what comes back is a plain FalconForCausalLM, and its saved NF4 checkpoint (bitsandbytes
    # serialisation) needs the same trick to load: the same logits after the round trip.
    import bitsandbytes as bnb
    from transformers import FalconForCausalLM

    from tuneforge.testing import tiny_model
    from tuneforge.testing.tiny import tiny_batch

    tiny_model("falcon").save_pretrained(tmp_path / "dense")
    options = dict(max_seq_length=64, dtype=torch.float32, load_in_4bit=True, use_kernels=False)
    with caplog.at_level("INFO", logger="tuneforge.models.loader"):
        model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "dense"), **options)
    assert "FalconLinear layers built as nn.Linear" in caplog.text and "stay" not in caplog.text
    assert type(model) is FalconForCausalLM
    model.save_pretrained(tmp_path / "nf4")
    reloaded, _ = FastLanguageModel.from_pretrained(str(tmp_path / "nf4"), **options)
    assert type(reloaded) is FalconForCausalLM and reloaded.config.architectures == ["FalconForCausalLM"]
    assert isinstance(reloaded.transformer.h[0].mlp.dense_h_to_4h, bnb.nn.Linear4bit)
    ids, mask, _ = tiny_batch(device=model.device)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
