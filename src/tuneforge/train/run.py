"""`tuneforge train`: a validated config in, a trained adapter, log, plot and summary out."""

from __future__ import annotations

import json
import logging
import os
import platform
import random
from importlib import resources
from pathlib import Path

from tuneforge.config import DEFAULT_DATASET, DEFAULT_HELDOUT, TrainConfig

logger = logging.getLogger(__name__)

RESOLVED_CONFIG_NAME = "config.resolved.json"
ADAPTER_DIRNAME = "adapter"
HELDOUT_ROWS = 40  # the shipped set's last rows: never trained on by default, scored by `tuneforge eval`


def default_dataset_path() -> Path:
    """The instruction set the package ships (200 Alpaca-style rows, see scripts/make_default_data.py)."""
    return Path(str(resources.files("tuneforge") / "resources" / "default_instructions.jsonl"))


def default_rows(part: str) -> list[dict]:
    """The shipped set split once for train and eval: "train" (all but the last HELDOUT_ROWS rows)
    or "heldout" (those last rows). The rows are shuffled when the file is made, so the tail holds
    every kind of task."""
    with default_dataset_path().open() as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return rows[:-HELDOUT_ROWS] if part == "train" else rows[-HELDOUT_ROWS:]


def dataset_source(path: str):
    """data.path -> what prepare_dataset reads: the shipped names become their rows."""
    if path == DEFAULT_DATASET:
        return default_rows("train")
    if path == DEFAULT_HELDOUT:
        return default_rows("heldout")
    return path


def versions() -> dict[str, str]:
    import importlib.metadata as metadata

    found = {"python": platform.python_version()}
    for name in ("tuneforge", "torch", "transformers", "peft", "trl", "bitsandbytes", "triton", "datasets"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def write_run_metadata(config: TrainConfig, output_dir: Path, resume: bool = False) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / RESOLVED_CONFIG_NAME
    if resume and path.is_file():
        _warn_config_changes(json.loads(path.read_text())["config"], config.to_dict())
    payload = {"config": config.to_dict(), "versions": versions(), "seed": config.training.seed}
    path.write_text(json.dumps(payload, indent=2))


# Keys a resumed run may change without changing what the finished steps computed.
_RESUMABLE_CHANGES = {"training.max_steps", "training.num_train_epochs", "training.save_steps",
                      "training.save_total_limit", "training.logging_steps", "training.report_to"}


def _warn_config_changes(before: dict, now: dict, prefix: str = "") -> None:
    for key in sorted(set(before) | set(now)):
        path = f"{prefix}{key}"
        old, new = before.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            _warn_config_changes(old, new, path + ".")
        elif old != new and path not in _RESUMABLE_CHANGES:
            logger.warning("--resume: %s changed from %r to %r; the resumed run will not match an "
                           "uninterrupted one", path, old, new)


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
        packing=data.packing,
    )
    if data.eval_fraction <= 0:
        return dataset, None
    split = dataset.train_test_split(test_size=data.eval_fraction, seed=config.training.seed, shuffle=True)
    return split["train"], split["test"]


def train(config: TrainConfig, resume: bool = False, extra_callbacks=(), strategy: str | None = None) -> dict:
    """Run one training job; returns the summary dict (also written to <output_dir>/summary.json).

    strategy: under torchrun / accelerate launch, "ddp" or "fsdp" (FSDP2, see train.distributed);
      None: fsdp if the launcher asked for it (ACCELERATE_USE_FSDP), else ddp.
    """
    import numpy as np
    import torch

    from tuneforge.models.fast_language_model import FastLanguageModel
    from tuneforge.train import distributed
    from tuneforge.train.trainer import SFTConfig, SFTTrainer

    from tuneforge.train.callbacks import resolve_report_to
    from tuneforge.train.guards import NonFiniteError, NonFiniteGuard
    from tuneforge.train.resume import prepare_resume

    if strategy is None and distributed.is_distributed():
        # `accelerate launch --use_fsdp` says so through the environment.
        strategy = "fsdp" if distributed.fsdp_requested() else "ddp"
    if strategy == "fsdp":
        os.environ[distributed.FSDP_ENV] = "true"  # before loading: NF4 storage FSDP2 can shard
    output_dir = Path(config.training.output_dir)
    checkpoint = prepare_resume(output_dir) if resume else None
    write_run_metadata(config, output_dir, resume=resume)
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
    # A named chat template may map EOS to its end-of-turn token: generation must stop there too.
    model.generation_config.eos_token_id = tokenizer.eos_token_id

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
        save_total_limit=t.save_total_limit or None,
        eval_strategy="steps" if (eval_dataset is not None and t.eval_steps > 0) else "no",
        eval_steps=t.eval_steps if t.eval_steps > 0 else None,
        # With evaluations, the Trainer tracks the lowest eval loss and never rotates that checkpoint away.
        metric_for_best_model="eval_loss" if eval_dataset is not None else None,
        greater_is_better=False if eval_dataset is not None else None,
        load_best_model_at_end=t.load_best_model_at_end,
        max_grad_norm=t.max_grad_norm,
        report_to="none",  # TensorBoard / W&B callbacks come from resolve_report_to
        max_length=model_config.max_seq_length,
        padding_free=config.data.packing,
        dataloader_num_workers=0,
        disable_tqdm=False,
        **(distributed.fsdp_arguments(model) if strategy == "fsdp" else {}),
    )
    callbacks = [NonFiniteGuard(output_dir), *resolve_report_to(t.report_to, output_dir), *extra_callbacks]
    if t.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(t.early_stopping_patience, t.early_stopping_threshold))
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    distributed.check_strategy(trainer, strategy)
    if checkpoint is not None:
        _continue_token_count(trainer, checkpoint)
    logger.info("family %s, %d training rows", spec.name if spec else "-", len(train_dataset))
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except NonFiniteError as error:
        (output_dir / "summary.json").write_text(json.dumps(
            {"stopped": str(error), "step": error.step,
             "last_good_checkpoint": str(error.checkpoint) if error.checkpoint else None}, indent=2))
        raise
    summary_callback = next(c for c in trainer.callback_handler.callbacks if c.__class__.__name__ == "SummaryCallback")
    summary = dict(summary_callback.summary)
    if eval_dataset is not None and args.eval_strategy == "no":
        summary["final_eval_loss"] = trainer.evaluate()["eval_loss"]
        logger.info("eval loss at the end: %.4f", summary["final_eval_loss"])
    adapter_dir = output_dir / ADAPTER_DIRNAME
    if distributed.is_distributed():
        # Every rank takes part (FSDP gathers the shards); rank 0 writes the whole adapter.
        trainer.save_model(str(adapter_dir))
    else:
        model.save_pretrained(adapter_dir)
    summary["adapter"] = str(adapter_dir)
    if trainer.args.should_save:
        tokenizer.save_pretrained(adapter_dir)
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"adapter saved to {adapter_dir}", flush=True)
    return summary


def _continue_token_count(trainer, checkpoint: Path) -> None:
    """TRL counts trained tokens from 0 in each process; carry the killed run's count on, so that
    log.csv's num_tokens reads the same as in an uninterrupted run."""
    history = json.loads((checkpoint / "trainer_state.json").read_text()).get("log_history", [])
    seen = max((entry.get("num_tokens", 0) for entry in history), default=0)
    if hasattr(trainer, "_total_train_tokens"):
        trainer._total_train_tokens = int(seen)
    else:
        logger.warning("--resume: this TRL version has no token counter to continue; num_tokens restarts at 0")
