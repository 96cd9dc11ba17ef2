"""tuneforge on 2 GPUs: DDP scaling and FSDP2 under a per-GPU memory budget (Llama-3.1-8B shape, QLoRA).

Every run is QLoRA as users run it (FastLanguageModel NF4 + LoRA r=16 on the seven projections,
offloaded gradient checkpointing, TRL SFTTrainer on accelerate), each one its own job (this file
in --worker mode: torchrun for 2 GPUs, a plain process for 1), on random tokens of a
random-initialised shape (bench/shapes.py).

  scaling  DDP, the same per-GPU batch on 1 then 2 GPUs: tokens/s of the whole job and the ratio
           (2.0 is linear).
  budget   a per-GPU memory budget B (torch.cuda.set_per_process_memory_fraction) that one GPU
           cannot train the workload in but FSDP2 over 2 GPUs can. First FSDP2 runs uncapped to
           measure its peak P; B = P + margin (or --budget-gib); then, both capped at B: 1 GPU
           (expected: out of memory) and FSDP2 on 2 GPUs (expected: trains). The workload is a
           long sequence (default 1 x 32768 tokens a GPU): FSDP2 halves the weights on each GPU
           (~2.8 GiB of 5.6 here), and each rank first loads the whole NF4 model before sharding
           it, so activations must outweigh that load for the saving to decide.
  fsdp     (optional) FSDP2 tokens/s at the scaling workload, for comparison with DDP.

  python bench/distributed.py --model /dev/shm/llama-3.1-8b --phases scaling,budget --out $OUT
  python bench/distributed.py --phases table --out $OUT          # the table again, from results

The model folder is made once if missing. Results append to <out>/distributed.jsonl; the table
prints at the end and is written to <out>/distributed.md.

Kernels (--kernels on, the default): all on for DDP. FSDP2 runs get the fused LoRA ops only if
they can read a weight gathered by FSDP2 (a plain tensor; bitsandbytes keeps its quant_state on
the module), probed in each run, and otherwise peft's LoRA forward with the other kernels on
("unfused-lora"). The capped 1-GPU run uses whatever the capped FSDP2 run used.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
UNFUSED = "unfused-lora"  # model kernels on (norms, RoPE, MLP activation, chunked loss), peft's LoRA forward


# ---------------------------------------------------------------- one run, in each torchrun process


def fused_lora_reads_fsdp_weights(device) -> bool:
    """Can the fused LoRA kernels read an NF4 weight as FSDP2 hands it over (a plain tensor)?"""
    import bitsandbytes as bnb
    import torch

    from tuneforge.kernels.nf4 import base_weight_parts

    layer = bnb.nn.Linear4bit(64, 64, bias=False, quant_type="nf4", quant_storage=torch.bfloat16,
                              compute_dtype=torch.bfloat16).to(device)
    layer.weight = torch.nn.Parameter(layer.weight.data.clone(), requires_grad=False)
    try:
        _, quant_state, _ = base_weight_parts(layer)
    except Exception:  # noqa: BLE001 - any failure means: not readable
        return False
    return quant_state is not None


def worker(args) -> None:
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from tuneforge.train import distributed

    rank, world = distributed.rank(), distributed.world_size()
    cuda = torch.cuda.is_available()
    result = {"id": args.id, "rank": rank, "world": world, "strategy": args.strategy, "batch": args.batch,
              "seq": args.seq, "budget_gib": args.budget_gib, "kernels": args.kernels, "error": None}
    device = distributed.device()
    if args.kernels == "auto":  # FSDP2 runs: fused LoRA only if it reads FSDP2-gathered NF4 weights
        args.kernels = "on" if fused_lora_reads_fsdp_weights(device) else UNFUSED
        result["kernels"] = args.kernels
        if args.kernels == UNFUSED and rank == 0:
            print("note: the fused LoRA kernels cannot read FSDP2-gathered NF4 weights yet (kernels/nf4."
                  "base_weight_parts ignores the module's quant_state): peft's LoRA forward, other kernels on",
                  flush=True)
    model_kernels, lora_kernels = args.kernels in ("on", UNFUSED), args.kernels == "on"
    if cuda:
        torch.cuda.set_device(device)
        result["device"] = torch.cuda.get_device_name(device)
        if args.budget_gib:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(args.budget_gib * 2**30 / total, device)
    out = Path(args.results) / f"rank{rank}.json"
    times: list[float] = []
    phase = "load"

    def memory() -> dict:
        if not cuda:
            return {}
        return {"peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3)}

    try:
        from datasets import Dataset
        from transformers import TrainerCallback

        from tuneforge import FastLanguageModel
        from tuneforge.train.trainer import SFTConfig, SFTTrainer

        if args.strategy == "fsdp":
            os.environ[distributed.FSDP_ENV] = "true"  # before loading: NF4 storage FSDP2 can shard
        start = time.perf_counter()
        dtype = torch.bfloat16 if cuda else torch.float32
        model, tokenizer = FastLanguageModel.from_pretrained(
            args.model, max_seq_length=args.seq, dtype=dtype, load_in_4bit=True, use_kernels=model_kernels)
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, target_modules=SEVEN,
                                                 use_gradient_checkpointing="unsloth", random_state=3407,
                                                 use_kernels=lora_kernels)
        result["load_s"] = round(time.perf_counter() - start, 1)
        result.update({f"load_{k}": v for k, v in memory().items()})
        steps = args.warmup + args.steps
        generator = torch.Generator().manual_seed(1234)
        rows = torch.randint(0, model.config.vocab_size, (steps * args.batch * world, args.seq), generator=generator)
        dataset = Dataset.from_dict({"input_ids": rows.tolist()})

        class StepTimer(TrainerCallback):
            def on_step_begin(self, *_, **__):
                if cuda:
                    torch.cuda.synchronize()
                self.start = time.perf_counter()

            def on_step_end(self, *_, **__):
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - self.start)

        config = SFTConfig(
            output_dir=str(Path(args.results) / "trainer"), max_steps=steps, per_device_train_batch_size=args.batch,
            learning_rate=2e-4, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no",
            max_length=args.seq, dataloader_num_workers=0, disable_tqdm=True, seed=3407,
            **(distributed.fsdp_arguments(model) if args.strategy == "fsdp" else {}),
        )
        if tokenizer is None:  # random shapes ship no tokenizer; the data are token ids already
            tokenizer = _placeholder_tokenizer(model.config.vocab_size)
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[StepTimer()])
        distributed.check_strategy(trainer, args.strategy if world > 1 else None)
        phase = "train"
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        timed = times[args.warmup:]
        median = statistics.median(timed)
        result.update(
            wrapper=type(trainer.model_wrapped).__name__, optim=str(getattr(config.optim, "value", config.optim)),
            steps=len(times), step_s_median=round(median, 4), step_s_spread=round(max(timed) - min(timed), 4),
            tokens_per_s=round(args.batch * args.seq * world / median, 1),
            loss_first=losses[0], loss_last=losses[-1], finite=all(math.isfinite(x) for x in losses),
        )
    except Exception as error:  # noqa: BLE001 - recorded, then this process ends the job
        oom = isinstance(error, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in str(error)
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        result["error"] = f"{'OOM' if oom else type(error).__name__} during {phase} (step {len(times) + 1}): {first}"
        result["steps"] = len(times)
    result.update(memory())
    out.write_text(json.dumps(result))
    if result["error"]:
        # The other ranks may wait in a collective for this one: end the job, torchrun stops them.
        sys.stdout.flush()
        os._exit(3)


# ---------------------------------------------------------------- the runs, from one process


def launch(args, run_id: str, nproc: int, strategy: str, batch: int, seq: int, budget: float | None,
           kernels: str) -> dict:
    results = Path(args.out) / "runs" / run_id
    results.mkdir(parents=True, exist_ok=True)
    for old in results.glob("rank*.json"):
        old.unlink()
    # One GPU: a plain process (no DDP wrapper, no process group), the honest single-GPU baseline.
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command = [sys.executable, *launcher, str(Path(__file__).resolve()), "--worker", "--id", run_id, "--model", str(args.model),
               "--strategy", strategy, "--batch", str(batch), "--seq", str(seq), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--kernels", kernels, "--results", str(results)]
    if budget:
        command += ["--budget-gib", f"{budget:.3f}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    if nproc == 1:
        # A plain process that sees two GPUs makes transformers' Trainer wrap the model in
        # nn.DataParallel (which TRL refuses): the single-GPU run sees one.
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    print(f"[{run_id}] {nproc} GPU(s), {strategy}, {batch} x {seq}"
          + (f", budget {budget:.2f} GiB/GPU" if budget else "") + f", kernels {kernels}", flush=True)
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
        tail = (done.stderr or done.stdout).strip().splitlines()[-8:]
        code = done.returncode
    except subprocess.TimeoutExpired:
        tail, code = [f"timeout after {args.timeout} s"], None
    ranks = [json.loads(p.read_text()) for p in sorted(results.glob("rank*.json"))]
    row = {"id": run_id, "gpus": nproc, "strategy": strategy, "batch": batch, "seq": seq, "budget_gib": budget,
           "kernels": kernels, "wall_s": round(time.perf_counter() - start, 1), "exit": code}
    if ranks:
        row["kernels"] = ranks[0]["kernels"]  # "auto" resolved by the worker
    errors = [r["error"] for r in ranks if r.get("error")]
    if errors:
        row["error"] = errors[0]
    elif code != 0 or len(ranks) != nproc:
        row["error"] = f"exit {code}, {len(ranks)}/{nproc} ranks reported: " + " | ".join(tail)[-500:]
    if ranks:
        main = next((r for r in ranks if r["rank"] == 0), ranks[0])
        for key in ("tokens_per_s", "step_s_median", "step_s_spread", "loss_first", "loss_last", "finite", "steps",
                    "wrapper", "optim", "load_s", "device"):
            if key in main:
                row[key] = main[key]
        for key in ("peak_alloc_gib", "peak_reserved_gib", "load_peak_alloc_gib"):
            values = [r[key] for r in ranks if key in r]
            if values:
                row[key] = max(values)  # the fullest GPU
    with open(Path(args.out) / "distributed.jsonl", "a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(f"[{run_id}] " + (f"error: {row['error']}" if row.get("error") else
                            f"{row.get('tokens_per_s', 0):,.0f} tokens/s, peak {row.get('peak_alloc_gib', '-')} GiB/GPU"),
          flush=True)
    return row


def run_phases(args) -> list[dict]:
    rows = []
    phases = args.phases.split(",")
    scaling = dict(batch=args.batch, seq=args.seq)
    budget_load = dict(batch=args.budget_batch, seq=args.budget_seq)
    fsdp = "auto" if args.kernels == "on" else "off"  # decided in the worker, see fused_lora_reads_fsdp_weights
    if "scaling" in phases:
        rows.append(launch(args, "ddp-1gpu", 1, "ddp", budget=None, kernels=args.kernels, **scaling))
        rows.append(launch(args, "ddp-2gpu", 2, "ddp", budget=None, kernels=args.kernels, **scaling))
    if "fsdp" in phases:
        rows.append(launch(args, "fsdp-2gpu", 2, "fsdp", budget=None, kernels=fsdp, **scaling))
    if "budget" in phases:
        budget = args.budget_gib
        if budget is None:
            free = launch(args, "fsdp-2gpu-uncapped", 2, "fsdp", budget=None, kernels=fsdp, **budget_load)
            rows.append(free)
            if free.get("error"):
                print("budget phase stopped: the uncapped FSDP2 run failed", flush=True)
                return rows
            budget = free.get("peak_reserved_gib", 0.0) + args.budget_margin_gib
        sharded = launch(args, "fsdp-2gpu-capped", 2, "fsdp", budget=budget, kernels=fsdp, **budget_load)
        rows.append(sharded)
        # The same kernels as FSDP2 got, or the comparison would measure the kernels, not the sharding.
        same = sharded.get("kernels") if sharded.get("kernels") in ("on", "off", UNFUSED) else args.kernels
        rows.append(launch(args, "single-capped", 1, "ddp", budget=budget, kernels=same, **budget_load))
    return rows


def table(rows: list[dict]) -> str:
    header = ["run", "GPUs", "wrap", "kernels", "batch x seq per GPU", "budget GiB/GPU", "tokens/s (job)",
              "vs 1 GPU", "peak alloc / reserved GiB (fullest GPU)", "loss first -> last", "result"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    single = {(r["batch"], r["seq"]): r["tokens_per_s"] for r in rows
              if r["strategy"] == "ddp" and r["gpus"] == 1 and r.get("tokens_per_s") and not r.get("budget_gib")}
    for row in rows:
        tps, base = row.get("tokens_per_s"), single.get((row["batch"], row["seq"]))
        cells = [
            row["id"], str(row["gpus"]), row["strategy"].upper() if row["gpus"] > 1 else "-", str(row.get("kernels")),
            f"{row['batch']} x {row['seq']}", f"{row['budget_gib']:.2f}" if row.get("budget_gib") else "-",
            f"{tps:,.0f}" if tps else "-", f"{tps / base:.2f}x" if tps and base else "",
            f"{row.get('peak_alloc_gib', '-')} / {row.get('peak_reserved_gib', '-')}",
            f"{row['loss_first']:.4f} -> {row['loss_last']:.4f}" if "loss_last" in row else "",
            row.get("error") or f"trained {row.get('steps')} steps",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> list[str]:
    """The two claims, each one line: DDP scaling, and the budget that only FSDP2 trains under."""
    notes = []
    by_id = {row["id"]: row for row in rows}
    one, two = by_id.get("ddp-1gpu"), by_id.get("ddp-2gpu")
    if one and two and one.get("tokens_per_s") and two.get("tokens_per_s"):
        ratio = two["tokens_per_s"] / one["tokens_per_s"]
        notes.append(f"DDP: {two['tokens_per_s']:,.0f} tokens/s on 2 GPUs vs {one['tokens_per_s']:,.0f} on 1: "
                     f"{ratio:.2f}x ({'meets' if ratio >= 1.8 else 'below'} the 1.8x target)")
    single, sharded = by_id.get("single-capped"), by_id.get("fsdp-2gpu-capped")
    if single and sharded:
        budget = sharded["budget_gib"]
        single_text = ("runs out of memory" if "OOM" in (single.get("error") or "")
                       else f"did not run out of memory ({single.get('error') or 'trained'})")
        fsdp_text = (f"trains ({sharded.get('steps')} steps, peak {sharded.get('peak_alloc_gib', '-')} GiB allocated, "
                     f"{sharded.get('tokens_per_s', 0):,.0f} tokens/s)" if not sharded.get("error")
                     else f"failed: {sharded['error']}")
        notes.append(f"Budget {budget:.2f} GiB per GPU, {single['batch']} x {single['seq']} tokens per GPU: "
                     f"one GPU {single_text}; FSDP2 on 2 GPUs {fsdp_text}")
    return notes


def _placeholder_tokenizer(vocab_size: int):
    """A word-level tokenizer over `vocab_size` ids with a pad token: TRL's trainer needs a
    processing class, and the benchmark feeds token ids directly."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", eos_token="t1", unk_token="t0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--id", default="run", help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, default=Path("/dev/shm/llama-3.1-8b"),
                        help="model folder (made from --shape if missing)")
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--phases", default="scaling,budget", help="scaling, budget, fsdp, table (comma-separated)")
    parser.add_argument("--batch", type=int, default=2, help="scaling: per-GPU batch")
    parser.add_argument("--seq", type=int, default=2048, help="scaling: sequence length")
    parser.add_argument("--budget-batch", type=int, default=1)
    parser.add_argument("--budget-seq", type=int, default=32768)
    parser.add_argument("--budget-gib", type=float, help="per-GPU budget; default: the uncapped FSDP2 peak + margin")
    parser.add_argument("--budget-margin-gib", type=float, default=0.75)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--kernels", choices=["on", "off", "auto", UNFUSED], default="on",
                        help="auto (what FSDP2 runs get with on): fused LoRA only if it reads FSDP2-gathered NF4")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per run")
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = []
    if args.phases != "table":
        if not (args.model / "config.json").is_file():
            # In its own process: this one must hold no GPU memory while the runs measure theirs.
            subprocess.run([sys.executable, str(HERE / "shapes.py"), args.shape, str(args.model)], check=True)
        rows = run_phases(args)
    if "table" in args.phases.split(",") or not rows:
        path = Path(args.out) / "distributed.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    text = table(rows) + "\n\n" + "\n".join(summary(rows))
    (Path(args.out) / "distributed.md").write_text(text + "\n")
    print("\n" + text, flush=True)


if __name__ == "__main__":
    main()
