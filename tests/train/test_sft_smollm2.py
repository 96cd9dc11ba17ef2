"""End to end on the real SmolLM2-135M (CPU): training lowers the loss, the adapter reloads with
plain peft and gives identical logits, the run folder holds what a person needs."""

import json

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneforge.config import config_from_dict
from tuneforge.train.command import train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, smollm2_dir):
    output = tmp_path_factory.mktemp("sft-run")
    config = config_from_dict({
        "model": {"max_seq_length": 256},
        "lora": {"gradient_checkpointing": False},
        "training": {"output_dir": str(output), "max_steps": 24, "learning_rate": 3e-4, "warmup_steps": 2,
                     "per_device_train_batch_size": 4, "optim": "adamw_torch"},
    })
    summary = train(config)
    return output, summary


def test_training_lowers_the_loss(trained_run):
    output, summary = trained_run
    from tuneforge.train.callbacks import read_log

    losses = [row["loss"] for row in read_log(output) if "loss" in row]
    assert len(losses) == 24
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    # SmolLM2-Instruct starts near 2 nats/token on these answers; a real update drops that clearly.
    assert last < 0.8 * first, (first, last)
    assert summary["steps"] == 24 and summary["tokens_per_second"] > 0


def test_run_folder_has_log_plot_summary_and_config(trained_run):
    output, _ = trained_run
    for name in ("log.csv", "loss.png", "summary.json", "config.resolved.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (output / name).is_file(), name
    resolved = json.loads((output / "config.resolved.json").read_text())
    assert resolved["versions"]["torch"].startswith("2.") and resolved["seed"] == 3407


def test_adapter_reloads_with_plain_peft_and_gives_identical_logits(trained_run, smollm2_dir):
    output, _ = trained_run
    from tuneforge.fast_language_model import load_for_inference

    ours, tokenizer = load_for_inference(str(output))
    base = AutoModelForCausalLM.from_pretrained(
        smollm2_dir, dtype=torch.float32, device_map="cpu",
        quantization_config=__import__("transformers").BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32),
    )
    plain = peft.PeftModel.from_pretrained(base, output / "adapter").eval()
    ids = AutoTokenizer.from_pretrained(output / "adapter")("What is the capital of Chile?", return_tensors="pt")
    with torch.no_grad():
        expected = plain(**ids).logits
        got = ours(**ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    # The adapter really changed the model.
    with torch.no_grad(), plain.disable_adapter():
        untouched = plain(**ids).logits
    assert (untouched - expected).abs().max() > 1e-2
