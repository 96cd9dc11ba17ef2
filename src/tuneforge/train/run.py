"""`tuneforge train`: a validated config in, a trained adapter, log, plot and summary out."""

from __future__ import annotations

import json
import logging
import platform
import random
from importlib import resources
from pathlib import Path

from tuneforge.config import DEFAULT_DATASET, TrainConfig

logger = logging.getLogger(__name__)

RESOLVED_CONFIG_NAME = "config.resolved.json"
ADAPTER_DIRNAME = "adapter"


def default_dataset_path() -> Path:
    """The instruction set the package ships (200 Alpaca-style rows, see scripts/make_default_data.py)."""
    return Path(str(resources.files("tuneforge") / "resources" / "default_instructions.jsonl"))


def dataset_source(path: str) -> str:
    return str(default_dataset_path()) if path == DEFAULT_DATASET else path


def versions() -> dict[str, str]:
    import importlib.metadata as metadata

    found = {"python": platform.python_version()}
    for name in ("tuneforge", "torch", "transformers", "peft", "trl", "bitsandbytes", "triton", "datasets"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def write_run_metadata(config: TrainConfig, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    payload = {"config": config.to_dict(), "versions": versions(), "seed": config.training.seed}
    (output_dir / RESOLVED_CONFIG_NAME).write_text(json.dumps(payload, indent=2))


def build_datasets(config: TrainConfig, tokenizer, chat_template: str | None):
    """Tokenized train (and optional eval) datasets with input_ids / labels."""
    from tuneforge.data import prepare_dataset

    data = config.data
    dataset = prepare_dataset(
        dataset_source(data.path),
        tokenizer,
        split=data.split,
        format=data.format,
        chat_template=chat_template,
        field_map=data.field_map,
        max_seq_length=config.model.max_seq_length,
        overflow=data.overflow,
        train_on_responses_only=data.train_on_responses_only,
    )
    if data.eval_fraction <= 0:
        return dataset, None
    split = dataset.train_test_split(test_size=data.eval_fraction, seed=config.training.seed, shuffle=True)
    return split["train"], split["test"]


def train(config: TrainConfig, resume: bool = False, extra_callbacks=()) -> dict:
    """Run one training job; returns the summary dict (also written to <output_dir>/summary.json)."""
    import numpy as np
    import torch

    from tuneforge.models.fast_language_model import FastLanguageModel
    from tuneforge.train.trainer import SFTConfig, SFTTrainer

    output_dir = Path(config.training.output_dir)
    write_run_metadata(config, output_dir)
    seed = config.training.seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    model_config, lora = config.model, config.lora
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_config.name,
        max_seq_length=model_config.max_seq_length,
        dtype=None if model_config.dtype == "auto" else model_config.dtype,
        load_in_4bit=model_config.load_in_4bit,
        load_in_8bit=model_config.load_in_8bit,
        full_finetuning=model_config.full_finetuning,
        use_kernels=model_config.use_kernels,
    )
    if not model_config.full_finetuning:
        model = FastLanguageModel.get_peft_model(
            model,
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            use_rslora=lora.use_rslora,
            modules_to_save=lora.modules_to_save,
            use_gradient_checkpointing=lora.gradient_checkpointing,
            random_state=lora.random_state,
            use_kernels=model_config.use_kernels,
        )
    spec = getattr(model.get_base_model() if hasattr(model, "get_base_model") else model, "tuneforge_family", None)
    chat_template = config.data.chat_template
    train_dataset, eval_dataset = build_datasets(config, tokenizer, chat_template)

    t = config.training
    args = SFTConfig(
        output_dir=str(output_dir),
        max_steps=t.max_steps if t.max_steps > 0 else -1,
        num_train_epochs=t.num_train_epochs,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        embedding_learning_rate=t.embedding_learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        optim=t.optim,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps > 0 else "no",
        save_steps=t.save_steps if t.save_steps > 0 else 500,
        eval_strategy="steps" if (eval_dataset is not None and t.eval_steps > 0) else "no",
        eval_steps=t.eval_steps if t.eval_steps > 0 else None,
        max_grad_norm=t.max_grad_norm,
        max_length=model_config.max_seq_length,
        padding_free=config.data.packing,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=list(extra_callbacks),
    )
    logger.info("family %s, %d training rows", spec.name if spec else "-", len(train_dataset))
    trainer.train(resume_from_checkpoint=True if resume else None)
    adapter_dir = output_dir / ADAPTER_DIRNAME
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    summary_callback = next(c for c in trainer.callback_handler.callbacks if c.__class__.__name__ == "SummaryCallback")
    summary = dict(summary_callback.summary, adapter=str(adapter_dir))
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"adapter saved to {adapter_dir}", flush=True)
    return summary
