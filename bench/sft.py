"""Real SFT through each stack's own SFTTrainer: variable-length rows, padded and packed.

What users run, copied from the notebooks: FastLanguageModel.from_pretrained(load_in_4bit=True),
get_peft_model(r=16, seven projections, use_gradient_checkpointing="unsloth"), then the stack's
SFTTrainer with dataset_text_field="text", optim="adamw_8bit", bf16, lr 2e-4, logging_steps=1.
Rows have log-normal lengths (median ~400 tokens, capped at --seq), written as text over the
shape's placeholder word-level vocabulary ("t17 t905 ..."), so each stack tokenizes, truncates,
pads or packs them itself.

  padded: packing=False, --batch rows per step (each stack's collator pads; tuneforge's trainer
          drops the pads into one padding-free row, Unsloth's does its own thing)
  packed: packing=True, --packed-rows rows of --seq tokens per step

Stack "loop": tuneforge's model, and its SFTTrainer's own dataset, collator, optimizer and scheduler,
stepped by a plain loop (autocast bf16, forward with labels, backward, optimizer and scheduler step)
instead of `trainer.train()`: the trainer path against our own loop on the same batches (issue #16
asks for the trainer within 15% of the loop).

Tokens/s counts real (non-pad) tokens at the collator, per batch, over the timed steps (after
--warmup optimizer steps): Unsloth raises gradient_accumulation_steps 1 -> 2 on its own, so
counting per batch compares the same work. Cold start: process start to the end of the first step.

  python bench/sft.py --model /dev/shm/llama-3.2-1b --stacks tuneforge,unsloth --modes packed,padded --out $OUT
  (one run: python bench/sft.py --model ... --one tuneforge:packed)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
START = time.perf_counter()
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lengths(rows: int, longest: int, seed: int = 11) -> list[int]:
    """Log-normal token counts, median 400, sigma 0.9 (a long tail: ~3% above 2,000), in [24, longest]."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    draws = torch.exp(torch.randn(rows, generator=generator) * 0.9 + math.log(400))
    return [int(min(max(x, 24), longest)) for x in draws.tolist()]


def text_rows(rows: int, longest: int, vocab: int) -> list[dict]:
    import torch

    generator = torch.Generator().manual_seed(5)
    # Leave room for the BOS / EOS a tokenizer may add; ids above the specials.
    return [{"text": " ".join(f"t{i}" for i in torch.randint(8, vocab, (n - 2,), generator=generator).tolist())}
            for n in lengths(rows, longest)]


def load(stack: str, model_dir: str, seq: int):
    import torch

    if stack == "unsloth":
        site = os.environ.get("TUNEFORGE_BENCH_UNSLOTH_SITE", "/tmp/unsloth-site")
        if Path(site).is_dir():
            sys.path.insert(0, site)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import unsloth  # noqa: F401  (before transformers and trl: it patches them)
        from trl import SFTConfig, SFTTrainer
        from unsloth import FastLanguageModel
    else:
        sys.path.insert(0, str(HERE.parent / "src"))
        from tuneforge import FastLanguageModel, SFTConfig, SFTTrainer
    model, tokenizer = FastLanguageModel.from_pretrained(model_dir, max_seq_length=seq, load_in_4bit=True,
                                                         dtype=torch.bfloat16)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, target_modules=SEVEN,
                                             use_gradient_checkpointing="unsloth", random_state=3407)
    return model, tokenizer, SFTConfig, SFTTrainer


class TokenCounter:
    """Wraps the trainer's collator: real tokens of every batch, in the order batches are made."""

    def __init__(self, collator):
        self.collator, self.counts = collator, []

    def __call__(self, features):
        batch = self.collator(features)
        mask = batch.get("attention_mask")
        if "num_real_tokens" in batch:  # padded to a budget for CUDA graphs (tuneforge's PaddingFreeBatches)
            self.counts.append(int(batch["num_real_tokens"]))
        else:
            self.counts.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch


def plain_loop(trainer, max_steps: int, warmup: int, counter, marks: dict, sync, cuda: bool) -> list[float]:
    """`max_steps` optimizer steps over the trainer's own batches, without the trainer's step machinery
    (no gradient clipping, logging or callbacks); marks as the Clock callback sets them."""
    import contextlib

    import torch

    trainer.create_optimizer_and_scheduler(num_training_steps=max_steps)
    optimizer, scheduler = trainer.optimizer, trainer.lr_scheduler
    model = trainer.model
    model.train()
    batches, losses = iter(trainer.get_train_dataloader()), []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    graphed = None
    if getattr(trainer, "_graphs", False):  # TUNEFORGE_CUDA_GRAPHS=1: the loop replays graphs too
        from tuneforge.train.graphed_step import GraphedStep

        graphed = GraphedStep(model)
    for step in range(1, max_steps + 1):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(trainer.get_train_dataloader())
            batch = next(batches)
        batch = trainer._prepare_inputs(batch)
        if graphed is not None:
            loss = graphed.step(dict(batch, use_cache=False))
        else:
            with autocast:
                loss = model(**batch).loss
            loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if step == 1:
            sync()
            marks["first_step_end"] = time.perf_counter() - START
        if step in (warmup, max_steps):
            sync()
            marks[step] = (time.perf_counter(), len(counter.counts))
    return [float(x) for x in losses]


def run_one(stack: str, mode: str, args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()  # the CPU only for a dry run of this script on a tiny model
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model, tokenizer, SFTConfig, SFTTrainer = load("tuneforge" if stack == "loop" else stack, args.model, args.seq)
    loaded = time.perf_counter() - START
    data = Dataset.from_list(text_rows(args.rows, args.seq, model.config.vocab_size))
    packed = mode == "packed"
    config = SFTConfig(
        output_dir=f"/tmp/sft-{stack}-{mode}", per_device_train_batch_size=args.packed_rows if packed else args.batch,
        gradient_accumulation_steps=1, max_steps=args.warmup + args.steps, learning_rate=2e-4, warmup_steps=2,
        optim="adamw_8bit", bf16=cuda, fp16=False, logging_steps=1, save_strategy="no", report_to="none",
        seed=3407, dataset_text_field="text", max_length=args.seq, packing=packed, dataloader_num_workers=0,
        lr_scheduler_type="linear", weight_decay=0.01,
    )
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=data, args=config)
    counter = TokenCounter(trainer.data_collator)
    trainer.data_collator = counter
    marks = {}

    class Clock(TrainerCallback):
        def on_step_end(self, train_args, state, control, **kwargs):
            if state.global_step == 1:
                sync()
                marks["first_step_end"] = time.perf_counter() - START
            if state.global_step in (args.warmup, args.warmup + args.steps):
                sync()
                marks[state.global_step] = (time.perf_counter(), len(counter.counts))

    trainer.add_callback(Clock())
    error = None
    try:
        if stack == "loop":
            loop_losses = plain_loop(trainer, config.max_steps, args.warmup, counter, marks, sync, cuda)
        else:
            trainer.train()
    except torch.OutOfMemoryError as oom:
        error = f"OOM: {str(oom).splitlines()[0][:160]}"
    result = {"stack": stack, "mode": mode, "model": Path(args.model).name,
              "device": torch.cuda.get_device_name() if cuda else "cpu",
              "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
              "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None,
              "load_s": round(loaded, 1), "cold_start_s": round(marks.get("first_step_end", float("nan")), 1),
              "accumulation": trainer.args.gradient_accumulation_steps, "error": error}
    if error is None and args.warmup in marks and args.warmup + args.steps in marks:
        (t0, n0), (t1, n1) = marks[args.warmup], marks[args.warmup + args.steps]
        tokens = sum(counter.counts[n0:n1])
        losses = loop_losses if stack == "loop" else [h["loss"] for h in trainer.state.log_history if "loss" in h]
        result.update(tokens_per_s=round(tokens / (t1 - t0), 1), timed_s=round(t1 - t0, 2), batches=n1 - n0,
                      tokens=tokens, loss_first=losses[0] if losses else None,
                      loss_last=losses[-1] if losses else None)
    return result


def table(results: list[dict]) -> str:
    rows = ["| mode | stack | real tokens/s | vs unsloth | peak alloc GiB | cold start s | loss first -> last | batches |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        peer = next((p for p in results if p["stack"] == "unsloth" and p["mode"] == r["mode"]
                     and p.get("tokens_per_s")), None)
        speed = r.get("tokens_per_s")
        ratio = f"{speed / peer['tokens_per_s']:.2f}x" if speed and peer else "-"
        loss = f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}" if r.get("loss_first") is not None else "-"
        rows.append(f"| {r['mode']} | {r['label']} | {f'{speed:,.0f}' if speed else r.get('error', '-')} | {ratio} | "
                    f"{r.get('peak_alloc_gib', '-')} | {r.get('cold_start_s', '-')} | {loss} | {r.get('batches', '-')} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--stacks", default="tuneforge,unsloth",
                        help="comma list; a stack may carry env switches: tuneforge%%TUNEFORGE_X=0")
    parser.add_argument("--modes", default="packed,padded")
    parser.add_argument("--one", help="stack:mode, run in this process (the driver's worker)")
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8, help="padded: rows per step")
    parser.add_argument("--packed-rows", type=int, default=4, help="packed: rows of --seq tokens per step")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--timeout", type=int, default=400)
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args()
    if args.one:
        stack, mode = args.one.split(":")
        print("RESULT " + json.dumps(run_one(stack, mode, args)), flush=True)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for mode in args.modes.split(","):
        for spec in args.stacks.split(","):
            stack, _, switch = spec.partition("%")
            env = dict(os.environ)
            if switch:
                key, _, value = switch.partition("=")
                env[key] = value
            command = [sys.executable, __file__, "--one", f"{stack}:{mode}", "--model", args.model,
                       "--rows", str(args.rows), "--seq", str(args.seq), "--batch", str(args.batch),
                       "--packed-rows", str(args.packed_rows), "--warmup", str(args.warmup), "--steps", str(args.steps)]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
                lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
                result = json.loads(lines[-1][7:]) if lines else {
                    "stack": stack, "mode": mode, "error": " | ".join((done.stderr or done.stdout).strip().splitlines()[-4:])[-500:]}
                (out / f"sft-{stack}-{mode}{'-' + switch.replace('=', '-') if switch else ''}.log").write_text(done.stdout[-20000:] + done.stderr[-40000:])
            except subprocess.TimeoutExpired:
                result = {"stack": stack, "mode": mode, "error": f"timeout after {args.timeout} s"}
            result["label"] = spec
            results.append(result)
            print(json.dumps(result), flush=True)
            with open(out / "sft_results.jsonl", "a") as f:
                f.write(json.dumps(result) + "\n")
    text = table(results)
    (out / "sft_table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
