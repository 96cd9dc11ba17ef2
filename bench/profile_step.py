"""Profile tuneforge's training step on a shape: where the GPU time goes, top ops by CUDA time.

  python bench/profile_step.py --model /dev/shm/llama-3.1-8b --batch 2 --seq 2048 --out $OUT
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import load_stack  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--stack", default="tuneforge")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--checkpointing", default="unsloth")
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args()
    model, optimizer = load_stack(args.stack, args.model, args.seq, args.checkpointing)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    table = profiler.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile-{args.stack}.txt").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
