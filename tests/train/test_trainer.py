"""SFTTrainer / SFTConfig take the arguments Unsloth's notebooks give them (older trl's names and
places), and the notebooks' fp16 / bf16 flags on a machine without CUDA."""

import logging

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, TrainingArguments

from tuneforge import FastLanguageModel, SFTConfig, SFTTrainer
from tuneforge.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
LOGGER = "tuneforge.train.trainer"
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU case of the precision flags")


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture
def model(tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.max_seq_length = 48  # what FastLanguageModel.from_pretrained sets
    return FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)


ROWS = Dataset.from_list([{"text": f"Row {i}: a short line of training text."} for i in range(8)])


def test_notebook_trainer_arguments_move_into_the_config(model, tokenizer, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        trainer = SFTTrainer(
            model, tokenizer=tokenizer, train_dataset=ROWS, dataset_text_field="text", max_seq_length=32,
            dataset_num_proc=1, packing=False,
            args=SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2),
        )
    assert trainer.processing_class is tokenizer
    assert trainer.args.max_length == trainer.args.max_seq_length == 32
    assert trainer.args.dataset_text_field == "text" and trainer.args.packing is False
    assert trainer.args.dataset_num_proc == 1
    assert "SFTTrainer(max_seq_length=32): moved into SFTConfig.max_length" in caplog.text
    assert max(len(row["input_ids"]) for row in trainer.train_dataset) <= 32
    stats = trainer.train()
    for key in ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "epoch"):
        assert key in stats.metrics, key
    assert stats.global_step == 2 and stats.metrics["train_runtime"] > 0


def test_max_length_defaults_to_the_models_max_seq_length(model, tokenizer, tmp_path):
    trainer = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=ROWS,
                         args=SFTConfig(output_dir=str(tmp_path), max_steps=1, dataset_text_field="text"))
    assert trainer.args.max_length == 48
    assert SFTConfig(output_dir=str(tmp_path), max_seq_length=64).max_length == 64
    with pytest.raises(ValueError, match="max_seq_length=64 and max_length=32 disagree"):
        SFTConfig(output_dir=str(tmp_path), max_seq_length=64, max_length=32)


@cpu_only
def test_notebook_precision_flags_on_a_cpu_train_in_fp32_with_a_log_line(tmp_path, caplog):
    from tuneforge import is_bfloat16_supported

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        args = SFTConfig(output_dir=str(tmp_path), fp16=not is_bfloat16_supported(), bf16=is_bfloat16_supported())
    assert args.fp16 is False and args.bf16 is False
    assert "fp16=True but there is no CUDA GPU: training in fp32" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert SFTConfig(output_dir=str(tmp_path), bf16=True).bf16 is False
    assert "bf16=True but there is no CUDA GPU" in caplog.text
    assert SFTConfig(output_dir=str(tmp_path), bf16=True, use_cpu=True).bf16 is True  # asked for explicitly


@cpu_only
def test_training_arguments_are_converted(model, tokenizer, tmp_path):
    """Older notebooks pass transformers' TrainingArguments (fp16 from is_bfloat16_supported)."""
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, learning_rate=1e-3, fp16=True, report_to="none")
    trainer = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=ROWS, dataset_text_field="text", args=args)
    assert isinstance(trainer.args, SFTConfig)
    assert trainer.args.max_steps == 3 and trainer.args.learning_rate == 1e-3 and trainer.args.fp16 is False
    assert trainer.args.max_length == 48


def test_arguments_that_cannot_be_honoured_say_so(model, tokenizer, tmp_path):
    args = SFTConfig(output_dir=str(tmp_path), dataset_text_field="text")
    with pytest.raises(TypeError, match="dataset_batch_size is no longer a trl argument"):
        SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=ROWS, dataset_batch_size=1000, args=args)
    other = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    with pytest.raises(ValueError, match="tokenizer= and processing_class= name two different tokenizers"):
        SFTTrainer(model=model, tokenizer=tokenizer, processing_class=other, train_dataset=ROWS, args=args)
