"""`tuneforge train`: a validated config in, a trained adapter, log, plot and summary out."""

from __future__ import annotations

import functools
import json
import logging
import platform
import random
from pathlib import Path

from tuneforge.models.record import record_of
from tuneforge.atomic import atomic_folder, atomic_write_text, is_disk_full
from tuneforge.config import TrainConfig
from tuneforge.data.sources import build_datasets
from tuneforge.train.run_folder import RESOLVED_CONFIG_NAME, read_resolved

logger = logging.getLogger(__name__)

ADAPTER_DIRNAME = "adapter"


def versions() -> dict[str, str]:
    import importlib.metadata as metadata

    found = {"python": platform.python_version()}
    for name in ("tuneforge", "torch", "transformers", "peft", "trl", "bitsandbytes", "triton", "datasets"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def write_run_metadata(config: TrainConfig, output_dir: Path, identity: dict, resumed_from: Path | None = None,
                       changes: list[str] = ()) -> None:
    """config.resolved.json: the config, versions, seed and the run's identity (what a resumed run
    is checked against); a resume appends where it continued from and what it was allowed to change."""
    output_dir.mkdir(parents=True, exist_ok=True)
    previous = read_resolved(output_dir) if resumed_from is not None else None
    resumes = list((previous or {}).get("resumes", []))
    if resumed_from is not None:
        resumes.append({"from": resumed_from.name, "changes": list(changes)})
    payload = {"config": config.to_dict(), "versions": versions(), "seed": config.training.seed,
               "identity": identity, "resumes": resumes}
    atomic_write_text(output_dir / RESOLVED_CONFIG_NAME, json.dumps(payload, indent=2))


def train(config: TrainConfig, resume: bool = False, extra_callbacks=(), strategy: str | None = None,
          overwrite: bool = False, allow_changes: bool = False) -> dict:
    """Run one training job; returns the summary dict (also written to <output_dir>/summary.json).

    The output folder belongs to this run (`run_folder.claim_output_dir`): a folder holding an
    earlier run is refused unless `resume` (continue it from its newest complete checkpoint, which
    must come from the same config, data and model unless `allow_changes`) or `overwrite` (replace
    it). All of that is checked before the model loads.
    strategy: under torchrun / accelerate launch, "ddp" or "fsdp" (FSDP2, see train.distributed);
      None: fsdp if the launcher asked for it (ACCELERATE_USE_FSDP), else ddp.
    Raises guards.Interrupted after Ctrl-C / SIGTERM, once the checkpoint and adapter are saved.
    """
    from tuneforge.train import distributed
    from tuneforge.train.resume import prepare_resume
    from tuneforge.train.run_folder import claim_output_dir, differences, identity_of_folder, run_identity

    if resume and overwrite:
        raise ValueError("resume continues the run in the output folder and overwrite replaces it: choose one")
    output_dir = Path(config.training.output_dir)
    claim = claim_output_dir(config, resume=resume, overwrite=overwrite, main_process=distributed.is_main_process())
    try:
        identity = run_identity(config)
        checkpoint, changes = None, []
        if resume:
            checkpoint = prepare_resume(output_dir, identity, allow_changes=allow_changes,
                                        max_steps=config.training.max_steps, tidy=distributed.is_main_process())
            before = identity_of_folder(output_dir)
            changes = differences(before, identity) if before else []
        if distributed.is_main_process():
            write_run_metadata(config, output_dir, identity, resumed_from=checkpoint, changes=changes)
        return _train(config, output_dir, identity, checkpoint, extra_callbacks, strategy)
    finally:
        claim.release()
        distributed.shutdown()


def _train(config: TrainConfig, output_dir: Path, identity: dict, checkpoint: Path | None, extra_callbacks,
           strategy: str | None) -> dict:
    import numpy as np
    import torch

    from tuneforge.fast_language_model import FastLanguageModel
    from tuneforge.train import distributed
    from tuneforge.train.trainer import SFTConfig

    from tuneforge.data.report import PrepareStats, report_before_training
    from tuneforge.train.callbacks import banner_lines, resolve_report_to, use_console_progress
    from tuneforge.train.guards import InterruptGuard, NonFiniteError, NonFiniteGuard

    if strategy is None and distributed.is_distributed():
        # `accelerate launch --use_fsdp` says so through the environment.
        strategy = "fsdp" if distributed.fsdp_requested() else "ddp"
    seed = config.training.seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    model_config = config.model
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_config.name,
        max_seq_length=model_config.max_seq_length,
        dtype=None if model_config.dtype == "auto" else model_config.dtype,
        load_in_4bit=model_config.load_in_4bit,
        load_in_8bit=model_config.load_in_8bit,
        full_finetuning=model_config.full_finetuning,
        use_kernels=model_config.use_kernels,
        # FSDP2 shards only floating parameters: the loader stores NF4 codes in the compute dtype.
        # None leaves it to the launcher (`accelerate launch --use_fsdp`, the `fsdp` switch).
        fsdp=True if strategy == "fsdp" else None,
    )
    if not model_config.full_finetuning:
        # The section's keys are get_peft_model's argument names (config.LoraSection).
        model = FastLanguageModel.get_peft_model(model, **config.lora.to_api(), use_kernels=model_config.use_kernels)
    spec = record_of(model).family
    chat_template = config.data.chat_template
    stats = PrepareStats()
    train_dataset, eval_dataset = build_datasets(config, tokenizer, chat_template, stats=stats)
    # Before any step: the data report (a DataError on data that cannot train), then the plan.
    stops = model.generation_config.eos_token_id
    main_process = distributed.is_main_process()
    report_before_training(stats, tokenizer, output_dir if main_process else None,
                           stop_ids=stops if isinstance(stops, list) else [stops], show=main_process)
    plan = _plan(config, tokenizer, stats, output_dir if main_process else None)
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
    interrupt = InterruptGuard()
    callbacks = [NonFiniteGuard(output_dir), interrupt, *resolve_report_to(t.report_to, output_dir), *extra_callbacks]
    if t.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(t.early_stopping_patience, t.early_stopping_threshold))
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.run_identity = identity
    use_console_progress(trainer)
    next(c for c in trainer.callback_handler.callbacks if c.__class__.__name__ == "SummaryCallback").estimate = \
        plan.estimate if plan is not None else None
    if distributed.is_main_process():
        print("\n".join(banner_lines(model, config, plan)), flush=True)
    distributed.check_strategy(trainer, strategy)
    if checkpoint is not None:
        _continue_token_count(trainer, checkpoint)
    logger.info("family %s, %d training rows", spec.name if spec else "-", len(train_dataset))
    with interrupt.installed():
        try:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except NonFiniteError as error:
            atomic_write_text(output_dir / "summary.json", json.dumps(
                {"stopped": str(error), "step": error.step,
                 "last_good_checkpoint": str(error.checkpoint) if error.checkpoint else None}, indent=2))
            raise
        except OSError as error:
            raise _disk_error(error, output_dir, "saving a checkpoint") from error
        summary_callback = next(c for c in trainer.callback_handler.callbacks
                                if c.__class__.__name__ == "SummaryCallback")
        summary = dict(summary_callback.summary)
        if interrupt.step is not None:
            summary["interrupted_at_step"] = interrupt.step
        elif eval_dataset is not None and args.eval_strategy == "no":
            summary["final_eval_loss"] = trainer.evaluate()["eval_loss"]
            logger.info("eval loss at the end: %.4f", summary["final_eval_loss"])
        adapter_dir = output_dir / ADAPTER_DIRNAME
        try:
            _save_adapter(trainer, model, tokenizer, adapter_dir)
        except OSError as error:
            raise _disk_error(error, output_dir, f"saving the adapter to {adapter_dir}") from error
    summary["adapter"] = str(adapter_dir)
    if trainer.args.should_save:
        atomic_write_text(output_dir / "summary.json", json.dumps(summary, indent=2))
        print(f"adapter saved to {adapter_dir}", flush=True)
    if interrupt.step is not None:
        from tuneforge.train.guards import Interrupted

        raise Interrupted(f"{interrupt.signal_name} at step {interrupt.step}: saved {output_dir / f'checkpoint-{interrupt.step}'}"
                          f" and the adapter ({adapter_dir}); add --resume to the same command to continue",
                          interrupt.step)
    return summary


def _save_adapter(trainer, model, tokenizer, adapter_dir: Path) -> None:
    """The adapter (and tokenizer) written whole into adapter/ or not at all (tuneforge.atomic)."""
    from tuneforge.train import distributed

    if not distributed.is_distributed():
        with atomic_folder(adapter_dir) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        return
    # Every rank takes part (FSDP gathers the shards); rank 0 writes the whole adapter. The staging
    # name must be the same on every rank, so it is fixed and rank 0 swaps it in.
    from tuneforge.atomic import remove, swap_into_place

    staging = adapter_dir.with_name(f".{adapter_dir.name}.tmp-distributed")
    trainer.save_model(str(staging))
    if trainer.args.should_save:
        try:
            tokenizer.save_pretrained(staging)
            swap_into_place(staging, adapter_dir)
        except BaseException:
            remove(staging)
            raise


def _disk_error(error: OSError, output_dir: Path, what: str):
    """A failed write as one clear line (a full disk above all), naming what is still safe."""
    from tuneforge.train.resume import ResumeError, last_complete_checkpoint

    if not is_disk_full(error) and not isinstance(error, PermissionError):
        return error
    last = last_complete_checkpoint(output_dir, deep=False)
    cause = "no space left on the device" if is_disk_full(error) else f"permission denied ({error.filename})"
    safe = (f"the last complete checkpoint is {last} (free some space, then --resume continues from it)" if last
            else "no checkpoint was saved before it (set training.save_steps to keep some)")
    return ResumeError(f"{cause} while {what}; nothing half-written was kept: {safe}")


@functools.cache
def _trainer_class():
    """SFTTrainer with whole-or-nothing checkpoints (resume.AtomicCheckpoints)."""
    from tuneforge.train.resume import AtomicCheckpoints
    from tuneforge.train.trainer import SFTTrainer

    return type("SFTTrainer", (AtomicCheckpoints, SFTTrainer), {"__module__": __name__})


def _plan(config: TrainConfig, tokenizer, stats, output_dir: Path | None):
    """The plan's estimate for the start banner and the summary (also <output_dir>/plan.json when
    given); None (logged) where it cannot be made: the estimate must never stop a run."""
    from tuneforge.planning import Lengths, plan_config

    lengths = [len(ids) for ids in stats.rows["input_ids"]] if stats.rows is not None else []
    try:
        plan = plan_config(config, tokenizer=tokenizer, lengths=Lengths(len(lengths), lengths) if lengths else None,
                           with_data=False)
    except Exception as error:  # an unusual config.json: say so and train on
        logger.warning("no memory / time estimate: %s: %s", type(error).__name__, error)
        return None
    if output_dir is not None:
        plan.write(output_dir)
    return plan


def _continue_token_count(trainer, checkpoint: Path) -> None:
    """TRL counts trained tokens from 0 in each process; carry the killed run's count on, so that
    log.csv's num_tokens reads the same as in an uninterrupted run."""
    history = json.loads((checkpoint / "trainer_state.json").read_text()).get("log_history", [])
    seen = max((entry.get("num_tokens", 0) for entry in history), default=0)
    if hasattr(trainer, "_total_train_tokens"):
        trainer._total_train_tokens = int(seen)
    else:
        logger.warning("--resume: this TRL version has no token counter to continue; num_tokens restarts at 0")
