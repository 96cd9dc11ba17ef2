"""tuneforge on 2 GPUs: DDP scaling and FSDP2 under a per-GPU memory budget (Llama-3.1-8B shape, QLoRA).

Every run is QLoRA as users run it (FastLanguageModel NF4 + LoRA r=16 on the seven projections,
offloaded gradient checkpointing, TRL SFTTrainer on accelerate), each one its own job (this file
in --worker mode: torchrun for 2 GPUs, a plain process for 1), on random tokens of a
random-initialised shape (bench/shapes.py).

  scaling  DDP, the same per-GPU batch on 1 then 2 GPUs: tokens/s of the whole job and the ratio
           (2.0 is linear).
  budget   a per-GPU memory budget B (torch.cuda.set_per_process_memory_fraction) under which one
           GPU cannot train the workload but FSDP2 over 2 GPUs can:
             1. one GPU trains it uncapped: its peak allocated memory P1 is what it needs;
             2. B = P1 - --budget-margin-gib (or --budget-gib): one GPU cannot hold its peak
                under B (reserved >= allocated), so it must run out of memory;
             3. FSDP2 on 2 GPUs, capped at B (expected: trains), and one GPU capped at B
                (expected: out of memory at step 1).
           FSDP2 divides what every GPU holds whole otherwise: the frozen NF4 layers and bf16
           embeddings, the LoRA weights, their gradients and optimizer state (about half of
           5.5 GiB here). Activations belong to each GPU's own tokens and are not divided, so
           the gap stays about the same at any length. The default workload, 1 x 32,768 tokens a
           GPU, is long enough that FSDP2's training peak (~8.5 GiB expected) is above its load
           peak (every rank loads the whole NF4 model, ~5.6 GiB, before sharding it), and it
           leaves FSDP2 ~2 GiB of headroom under B for the allocator's fragmentation.
  fsdp     (optional) FSDP2 tokens/s at the scaling workload, for comparison with DDP.

  python bench/distributed.py --model /dev/shm/llama-3.1-8b --phases scaling,budget --out $OUT
  python bench/distributed.py --phases table --out $OUT          # the table again, from results

The model folder is made once if missing. Results append to <out>/distributed.jsonl; the table
prints at the end and is written to <out>/distributed.md.

Each run counts the memory-saving paths it took (column "paths"): the loss in chunks (lm_head's
own forward, i.e. full [tokens x vocab] logits, never ran), the layer inputs offloaded, the LoRA
projections through the fused kernels. Kernels (--kernels on, the default): all on. FSDP2 runs
("auto") first check that the fused LoRA kernels compute a 4-bit layer from the weight FSDP2
hands over (a plain tensor; bitsandbytes keeps the quant_state on the module) exactly as
bitsandbytes does, and otherwise use peft's LoRA forward with the other kernels on
("unfused-lora", with a note). The capped 1-GPU run uses whatever the capped FSDP2 run used.
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
    """Do the fused LoRA kernels compute a 4-bit layer from the weight as FSDP2 hands it over?

    FSDP2 all-gathers the packed NF4 bytes into a plain tensor (typed as the quant storage dtype),
    not bitsandbytes' Params4bit with its quant_state: the kernels must find the state on the
    module and give bitsandbytes' own result (the training path: 64 rows that need a gradient).
    """
    import bitsandbytes as bnb
    import torch

    from tuneforge.lora.projections import lora_linear

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(256, 128, bias=False, quant_type="nf4", quant_storage=dtype,
                              compute_dtype=dtype).to(device)
    x = torch.randn(64, 256, device=device, dtype=dtype, requires_grad=True)
    with torch.no_grad():
        expected = layer(x)
    layer.weight = torch.nn.Parameter(layer.weight.data.clone(), requires_grad=False)  # FSDP2's gathered tensor
    try:
        got = lora_linear(x, layer)
    except Exception as error:  # noqa: BLE001 - any failure means: not readable
        print(f"note: fused LoRA on an FSDP2-gathered NF4 weight failed: {type(error).__name__}: {error}", flush=True)
        return False
    error = ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
    if error > 1e-2:
        print(f"note: fused LoRA on an FSDP2-gathered NF4 weight is off by {error:.2e} of the output range",
              flush=True)
    return error <= 1e-2


def count_fast_paths(model):
    """Count, in this process, the calls of the memory-saving paths; returns the live Counter.

    chunked_loss (the chunked cross-entropy's Function), full_logits (lm_head's own forward),
    offloaded_inputs (layer inputs packed by the offloaded checkpointing), fused_lora (the fused
    LoRA ops, forward and recompute).
    """
    import types
    from collections import Counter

    import tuneforge.kernels.cross_entropy as cross_entropy
    import tuneforge.lora.projections as lora
    from tuneforge.patch.activation_checkpointing import LayerInputOffloader

    counts = Counter()

    def counted(name, function):
        def call(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)
        return call

    # Module attributes, looked up at every call by the code that uses them (this process only).
    loss_function = cross_entropy.LinearCrossEntropyFunction
    cross_entropy.LinearCrossEntropyFunction = types.SimpleNamespace(apply=counted("chunked_loss", loss_function.apply))
    LayerInputOffloader.pack = counted("offloaded_inputs", LayerInputOffloader.pack)
    for name in ("lora_mlp", "lora_qkv", "lora_linear"):
        setattr(lora, name, counted("fused_lora", getattr(lora, name)))
    model.get_output_embeddings().register_forward_hook(lambda *_: counts.update(["full_logits"]))
    return counts


def describe_paths(counts: dict, steps: int) -> str:
    """One cell of the table: what ran, per step."""
    if not steps:
        return "-"
    per_step = {k: v / steps for k, v in counts.items()}
    parts = ["loss chunked" if per_step.get("chunked_loss") and not per_step.get("full_logits")
             else "FULL LOGITS"]
    parts.append(f"{per_step.get('offloaded_inputs', 0):.0f} inputs offloaded/step"
                 if per_step.get("offloaded_inputs") else "inputs NOT offloaded")
    parts.append("LoRA fused" if per_step.get("fused_lora") else "LoRA by peft")
    return ", ".join(parts)


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
            print("note: the fused LoRA kernels do not compute FSDP2-gathered NF4 weights right here: "
                  "peft's LoRA forward, other kernels on", flush=True)
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
    paths: dict = {}

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

        start = time.perf_counter()
        dtype = torch.bfloat16 if cuda else torch.float32
        model, tokenizer = FastLanguageModel.from_pretrained(  # fsdp: NF4 storage FSDP2 can shard
            args.model, max_seq_length=args.seq, dtype=dtype, load_in_4bit=True, use_kernels=model_kernels,
            fsdp=args.strategy == "fsdp" or None)
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, target_modules=SEVEN,
                                                 use_gradient_checkpointing="unsloth", random_state=3407,
                                                 use_kernels=lora_kernels)
        paths = count_fast_paths(model)
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
    result.update(memory(), paths=dict(paths))
    out.write_text(json.dumps(result))
    if result["error"]:
        # The other ranks may wait in a collective for this one: end the job, torchrun stops them.
        sys.stdout.flush()
        os._exit(3)


# ---------------------------------------------------------------- the runs, from one process


def launch(args, run_id: str, nproc: int, strategy: str, batch: int, seq: int, budget: float | None,
           kernels: str, steps: int, warmup: int) -> dict:
    results = Path(args.out) / "runs" / run_id
    results.mkdir(parents=True, exist_ok=True)
    for old in results.glob("rank*.json"):
        old.unlink()
    # One GPU: a plain process (no DDP wrapper, no process group), the honest single-GPU baseline.
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command = [sys.executable, *launcher, str(Path(__file__).resolve()), "--worker", "--id", run_id, "--model", str(args.model),
               "--strategy", strategy, "--batch", str(batch), "--seq", str(seq), "--steps", str(steps),
               "--warmup", str(warmup), "--kernels", kernels, "--results", str(results)]
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
                    "wrapper", "optim", "load_s", "device", "paths"):
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
    scaling = dict(batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup)
    budget_load = dict(batch=args.budget_batch, seq=args.budget_seq, steps=args.budget_steps,
                       warmup=args.budget_warmup)
    fsdp = "auto" if args.kernels == "on" else args.kernels  # "auto": see fused_lora_reads_fsdp_weights
    if "scaling" in phases:
        rows.append(launch(args, "ddp-1gpu", 1, "ddp", budget=None, kernels=args.kernels, **scaling))
        rows.append(launch(args, "ddp-2gpu", 2, "ddp", budget=None, kernels=args.kernels, **scaling))
    if "fsdp" in phases:
        rows.append(launch(args, "fsdp-2gpu", 2, "fsdp", budget=None, kernels=fsdp, **scaling))
    if "budget" in phases:
        budget = args.budget_gib
        if budget is None:
            # What one GPU needs: B just below it cannot hold that peak, whatever the allocator does.
            alone = launch(args, "single-uncapped", 1, "ddp", budget=None, kernels=args.kernels, **budget_load)
            rows.append(alone)
            if alone.get("error") or not alone.get("peak_alloc_gib"):
                print("budget phase stopped: the uncapped 1-GPU run failed", flush=True)
                return rows
            budget = alone["peak_alloc_gib"] - args.budget_margin_gib
        sharded = launch(args, "fsdp-2gpu-capped", 2, "fsdp", budget=budget, kernels=fsdp, **budget_load)
        rows.append(sharded)
        # The same kernels as FSDP2 got, or the comparison would measure the kernels, not the sharding.
        same = sharded.get("kernels") if sharded.get("kernels") in ("on", "off", UNFUSED) else args.kernels
        rows.append(launch(args, "single-capped", 1, "ddp", budget=budget, kernels=same, **budget_load))
    return rows


def table(rows: list[dict]) -> str:
    header = ["run", "GPUs", "wrap", "kernels", "batch x seq per GPU", "budget GiB/GPU", "tokens/s (job)",
              "vs 1 GPU", "peak alloc / reserved GiB (fullest GPU)", "loss first -> last", "paths", "result"]
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
            describe_paths(row.get("paths") or {}, row.get("steps") or 0),
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
        budget, alone = sharded["budget_gib"], by_id.get("single-uncapped")
        need = f" (uncapped it peaks at {alone['peak_alloc_gib']:.2f} GiB)" if alone and alone.get("peak_alloc_gib") else ""
        single_text = (f"runs out of memory{need}" if "OOM" in (single.get("error") or "")
                       else f"did NOT run out of memory ({single.get('error') or 'trained'}){need}")
        fsdp_text = (f"trains ({sharded.get('steps')} steps, peak {sharded.get('peak_alloc_gib', '-')} GiB allocated, "
                     f"{sharded.get('tokens_per_s', 0):,.0f} tokens/s)" if not sharded.get("error")
                     else f"failed: {sharded['error']}")
        shown = "shown" if not sharded.get("error") and "OOM" in (single.get("error") or "") else "NOT shown"
        notes.append(f"Budget {budget:.2f} GiB per GPU, {single['batch']} x {single['seq']} tokens per GPU: "
                     f"FSDP2 on 2 GPUs {fsdp_text}; one GPU {single_text}. Claim {shown}.")
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
    parser.add_argument("--budget-gib", type=float,
                        help="per-GPU budget; default: the uncapped 1-GPU peak allocated minus the margin")
    parser.add_argument("--budget-margin-gib", type=float, default=0.5)
    parser.add_argument("--budget-steps", type=int, default=3, help="budget runs: timed steps (peaks come at step 1)")
    parser.add_argument("--budget-warmup", type=int, default=1)
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
