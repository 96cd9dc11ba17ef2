"""Run the training benchmark for several stacks, each in its own process, and print one table.

  python bench/run.py --shape llama-3.1-8b --batch 2 --seq 2048 --stacks hf,liger,tuneforge --out $OUT
  python bench/run.py --shape llama-3.1-8b --longest --stacks hf,tuneforge --out $OUT

Ratios are against the first stack (the HF baseline). Results append to <out>/results.jsonl; the
table is also written as <out>/table.md and a bar chart <out>/throughput.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from shapes import make_shape  # noqa: E402


def run_stack(spec: str, model_dir: Path, batch: int, seq: int, steps: int, warmup: int, timeout: int,
              data: str = "random", samples: int = 256) -> dict:
    """spec: a stack name, optionally `@optimizer` and/or `#checkpointing` (tuneforge variants),
    e.g. `tuneforge@adamw_torch_fused#standard`."""
    import os

    spec, _, extra_env = spec.partition("%")  # e.g. tuneforge%TUNEFORGE_BENCH_ADDMM=1
    stack, _, checkpointing = spec.partition("#")
    stack, _, optim = stack.partition("@")
    command = [sys.executable, str(HERE / "throughput.py"), "--stack", stack, "--model", str(model_dir),
               "--batch", str(batch), "--seq", str(seq), "--steps", str(steps), "--warmup", str(warmup),
               "--label", spec[len(stack):]]
    if checkpointing:
        command += ["--checkpointing", checkpointing]
    if data != "random":
        command[command.index("--label") + 1] += f" {data}"
        command += ["--data", data, "--samples", str(samples)]
    env = dict(os.environ, **({"TUNEFORGE_BENCH_OPTIM": optim} if optim else {}))
    if extra_env:
        key, _, value = extra_env.partition("=")
        env[key] = value
        command[command.index("--label") + 1] += f" {extra_env}"
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"stack": spec, "batch": batch, "seq": seq, "error": f"timeout after {timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-6:]
        return {"stack": spec, "batch": batch, "seq": seq, "error": " | ".join(tail)[-600:]}
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall_s"] = round(time.perf_counter() - start, 1)
    return result


def table(results: list[dict]) -> str:
    base = next((r for r in results if r.get("tokens_per_s")), None)
    rows = ["| stack | shape | batch x seq | tokens/s | vs first | peak alloc GiB | peak reserved GiB | MFU | step-1 loss |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        speed = r.get("tokens_per_s")
        ratio = f"{speed / base['tokens_per_s']:.2f}x" if speed and base else "-"
        name = r["stack"] + (r["label"] if r.get("label") else "")
        shown_speed = f"{speed:,.0f}" if speed else r.get("error", "-")
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        loss = f"{r['loss_step1']:.4f}" if r.get("loss_step1") is not None else "-"
        rows.append(
            f"| {name} | {r.get('model', '-')} | {r['batch']} x {r['seq']} | {shown_speed} | {ratio} | "
            f"{r.get('peak_alloc_gib', '-')} | {r.get('peak_reserved_gib', '-')} | {mfu} | {loss} |"
        )
    return "\n".join(rows)


def chart(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in results if r.get("tokens_per_s")]
    if not done:
        return
    figure, (speed_axis, memory_axis) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    labels = [f"{r['stack']}{r.get('label') or ''}\n{r['model']}\n{r['batch']}x{r['seq']}" for r in done]
    speed_axis.bar(labels, [r["tokens_per_s"] for r in done], color="tab:blue")
    speed_axis.set_title("trained tokens / s")
    memory_axis.bar(labels, [r["peak_alloc_gib"] for r in done], color="tab:orange")
    memory_axis.set_title("peak allocated GiB")
    for axis in (speed_axis, memory_axis):
        axis.tick_params(axis="x", labelsize=7)
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", required=True)
    parser.add_argument("--stacks", default="hf,liger,tuneforge")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--longest", action="store_true", help="batch 1: double seq until OOM, per stack")
    parser.add_argument("--max-seq", type=int, default=131072)
    parser.add_argument("--start-seq", type=int, default=8192)
    parser.add_argument("--longest-steps", type=int, default=2, help="--longest: timed steps per length (after 1 warm-up)")
    parser.add_argument("--shape-dir", default="/dev/shm")
    parser.add_argument("--timeout", type=int, default=420)
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--data", default="random",
                        help="random, or a comma list of padded/packed: the same long-tailed samples padded per "
                             "batch vs packed padding-free (throughput.longtail_batches); tokens/s = real tokens")
    parser.add_argument("--samples", type=int, default=256)
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = make_shape(args.shape, Path(args.shape_dir) / args.shape)
    results = []
    for stack in args.stacks.split(","):
        if args.longest:
            seq = args.start_seq
            while seq <= args.max_seq:
                # A warm-up step, then timed ones: the first step at a new length pays one-time costs
                # (pinned host buffers for the offloaded layer inputs, cuDNN attention plans, the
                # allocator's growth) that a single-step time would count as training speed.
                result = run_stack(stack, model_dir, 1, seq, steps=args.longest_steps, warmup=1, timeout=args.timeout)
                result["label"] = " (longest)"
                results.append(result)
                print(json.dumps(result), flush=True)
                if not result.get("tokens_per_s"):
                    break
                seq *= 2
        else:
            for data in args.data.split(","):
                result = run_stack(stack, model_dir, args.batch, args.seq, args.steps, args.warmup, args.timeout,
                                   data=data, samples=args.samples)
                results.append(result)
                print(json.dumps(result), flush=True)
    with (out / "results.jsonl").open("a") as handle:
        for result in results:
            handle.write(json.dumps(result) + "\n")
    text = table(results)
    suffix = "-longest" if args.longest else "" if args.data == "random" else "-" + args.data.replace(",", "-")
    (out / f"table-{args.shape}{suffix}.md").write_text(text + "\n")
    chart(results, out / f"throughput-{args.shape}.png")
    print(text, flush=True)


if __name__ == "__main__":
    main()
