"""Inference: for_inference / for_training switch modes; greedy generation after for_inference (the
static-cache path of tuneforge.inference) equals plain transformers' generation on an untouched
model; `tuneforge chat` streams the same text that generate returns."""

from __future__ import annotations

import os
import subprocess
import sys

import peft
import pytest
import torch
from tiny_chat_model import save_tiny_chat_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneforge.chat import respond
from tuneforge.fast_language_model import load_for_inference
from tuneforge.fast_language_model import FastLanguageModel

PROMPT = "What is the capital of Peru?"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny chat model with its output layer scaled x20: a random model's next-token logits
    are nearly flat, and greedy decoding must not hinge on last-bit differences between paths."""
    folder = save_tiny_chat_model(tmp_path_factory.mktemp("chat") / "model")
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    model.save_pretrained(folder)
    return folder


def _prompt_ids(tokenizer, text=PROMPT):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)


def _greedy(model, tokenizer, ids, new=16):
    out = model.generate(**ids, max_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         output_scores=True, return_dict_in_generate=True)
    top2 = torch.stack([s[0].topk(2).values for s in out.scores])
    return out.sequences, (top2[:, 0] - top2[:, 1]).min().item()


def test_for_inference_and_for_training_switch_modes(model_dir):
    model, _ = FastLanguageModel.from_pretrained(str(model_dir), load_in_4bit=False, max_seq_length=256)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=True)
    base = model.get_base_model()
    for _ in range(2):
        FastLanguageModel.for_training(model)
        assert model.training and not base.config.use_cache and base.is_gradient_checkpointing
        FastLanguageModel.for_inference(model)
        assert not any(m.training for m in model.modules())
        assert base.config.use_cache and not base.is_gradient_checkpointing
    # Inference and training again give the same model: the adapter is untouched.
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("with_adapter", [False, True], ids=["model", "adapter"])
def test_greedy_generation_after_for_inference_equals_plain_transformers(model_dir, with_adapter):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = _prompt_ids(tokenizer)
    ours, _ = FastLanguageModel.from_pretrained(str(model_dir), load_in_4bit=False, max_seq_length=256)
    plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if with_adapter:  # the same nonzero LoRA weights in both
        ours = FastLanguageModel.get_peft_model(ours, r=4, lora_alpha=8, use_gradient_checkpointing=False)
        with torch.no_grad():
            for name, p in ours.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
        plain = peft.PeftModel(plain, ours.peft_config["default"])
        plain.load_state_dict(ours.state_dict(), strict=False)
        plain.eval()
    FastLanguageModel.for_inference(ours)
    expected, margin = _greedy(plain, tokenizer, ids)
    assert margin > 1e-3, "near-tie in the reference: the comparison would hinge on rounding"
    got = ours.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    inner = ours.get_base_model() if with_adapter else ours
    assert inner.tuneforge.generate_path.startswith("static cache"), inner.tuneforge.generate_path
    assert torch.equal(got, expected)
    assert got.shape[1] > ids["input_ids"].shape[1]


@pytest.fixture(scope="module")
def trained_run(model_dir, tmp_path_factory):
    """A `tuneforge train` run folder: a few steps at a high learning rate, so the adapter matters."""
    from tuneforge.config import config_from_dict
    from tuneforge.train.command import train

    output = tmp_path_factory.mktemp("chat-run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(config_from_dict({
            "model": {"name": str(model_dir), "load_in_4bit": False, "max_seq_length": 256, "use_kernels": False},
            "lora": {"r": 4, "alpha": 8, "gradient_checkpointing": False},
            "training": {"output_dir": str(output), "max_steps": 3, "learning_rate": 0.005, "warmup_steps": 0,
                         "optim": "adamw_torch", "report_to": "none"},
        }))
    finally:
        torch.set_num_threads(threads)
    return output


def test_respond_streams_what_generate_returns(smollm2_dir, monkeypatch):
    """On the real SmolLM2 (the streamer prints at word ends, so it needs words, which a random
    tiny model does not write)."""
    monkeypatch.setenv("TUNEFORGE_DISABLE_KERNELS", "1")  # the Triton interpreter would cost minutes
    model, tokenizer = load_for_inference(str(smollm2_dir), load_in_4bit=False)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = respond(model, tokenizer, messages, max_new_tokens=20, stream=False)
    writes = []
    monkeypatch.setattr(sys, "stdout", type("Capture", (), {"write": writes.append, "flush": lambda self: None})())
    streamed = respond(model, tokenizer, messages, max_new_tokens=20, stream=True)
    assert model.tuneforge.generate_path.startswith("static cache"), model.tuneforge.generate_path
    assert streamed == whole and "".join(writes) == whole + "\n"
    assert len([w for w in writes if w.strip()]) > 1, "printed in one piece: nothing was streamed"


def test_tuneforge_chat_prints_the_adapter_models_greedy_answer(trained_run):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "tuneforge.cli", "chat", "--model", str(trained_run), "--prompt",
                             PROMPT, "--max-new-tokens", "24", "--no-4bit"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # Reference: plain transformers + peft, the chat template of the adapter's tokenizer.
    adapter = trained_run / "adapter"
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    base = AutoModelForCausalLM.from_pretrained(peft.PeftConfig.from_pretrained(adapter).base_model_name_or_path)
    model = peft.PeftModel.from_pretrained(base, adapter).eval()
    ids = _prompt_ids(tokenizer)
    out, _ = _greedy(model, tokenizer, ids, new=24)
    expected = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert expected.strip() and result.stdout == expected + "\n"
