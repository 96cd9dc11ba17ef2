"""Profile a stack's training step on a shape: where the GPU time goes, top ops by CUDA time, and
GPU kernel time by category (matmul, NF4 dequantisation, LoRA, attention, optimizer, copies, ...)
against the step's wall time, with kernel launch counts.

  python bench/profile_step.py --model /dev/shm/llama-3.1-8b --batch 2 --seq 2048 --out $OUT
  python bench/profile_step.py --stack unsloth --model /dev/shm/llama-3.1-8b --out $OUT
"""

import argparse
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import load_stack  # noqa: E402


# First match wins; names are CUDA kernel names (cuBLAS/cutlass/nvjet, Triton function names, ATen).
CATEGORIES = [
    ("matmul", r"gemm|cutlass|nvjet|cublas|sm90_xmma|Kernel2"),
    ("attention", r"flash|fmha|attention|sdpa|efficient"),
    ("nf4 dequant", r"dequant|kDequantize|nf4"),
    ("lora rank update", r"rank_update"),
    ("optimizer", r"optimizer|adam|Adam|multi_tensor|foreach"),
    ("cross entropy", r"cross_entropy|logsumexp|_ce_|softmax|log_softmax|nll"),
    ("norm", r"rms|layer_norm|norm"),
    ("rope", r"rope|rotary"),
    ("activation", r"swiglu|geglu|silu|gelu|gated"),
    ("copy / cast", r"[Mm]emcpy|copy|to_copy|cast|Memset|fill"),
    ("elementwise", r"elementwise|vectorized|unrolled|reduce"),
]


def categorise(events, steps: int) -> str:
    """GPU kernel time per category per step (ms) and kernel launches per step."""
    totals, counts = {}, {}
    for event in events:
        duration_us = event.time_range.elapsed_us()
        if duration_us > 0:
            category = next((c for c, pattern in CATEGORIES if re.search(pattern, event.name)), "other")
            totals[category] = totals.get(category, 0.0) + duration_us / 1e3 / steps
            counts[category] = counts.get(category, 0) + 1 / steps
    lines = ["| category | GPU ms / step | kernels / step |", "|---|---|---|"]
    for category, ms in sorted(totals.items(), key=lambda item: -item[1]):
        lines.append(f"| {category} | {ms:.1f} | {counts[category]:.0f} |")
    lines.append(f"| **all kernels** | {sum(totals.values()):.1f} | {sum(counts.values()):.0f} |")
    return "\n".join(lines)


def warmed_up_step(stack: str, model_dir: str, batch: int, seq: int, checkpointing: str = "unsloth"):
    """Load `stack` on the shape, run 3 training steps on one random batch, return the step function."""
    model, optimizer = load_stack(stack, model_dir, seq, checkpointing)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--stack", default="tuneforge")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--checkpointing", default="unsloth")
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args()
    step = warmed_up_step(args.stack, args.model, args.batch, args.seq, args.checkpointing)
    start = time.perf_counter()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) / 3 * 1e3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in profiler.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    summary = (f"{args.stack} {Path(args.model).name} {args.batch} x {args.seq}: step wall {wall_ms:.1f} ms "
               f"(unprofiled)\n" + categorise(kernels, 2))
    print(summary, flush=True)
    table = summary + "\n\n" + profiler.key_averages().table(sort_by="cuda_time_total", row_limit=40,
                                                              max_name_column_width=70)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile-{args.stack}-{Path(args.model).name}.txt").write_text(table)
    print(table[len(summary):][:6000])


if __name__ == "__main__":
    main()
