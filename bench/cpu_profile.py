"""Where the CPU time of a training step goes (the step is launch-bound when the GPU waits on Python).

cProfile over --steps steps after warm-up, top functions by own time and by cumulative time, plus
the CPU cost of one launch: a Triton kernel (tuneforge's rank update on a tiny tensor) against a
torch elementwise op, each launched 2,000 times without synchronising.

  python bench/cpu_profile.py --model /dev/shm/llama-3.2-1b --batch 4 --out $OUT
"""

import argparse
import cProfile
import collections
import io
import pstats
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_step import warmed_up_step  # noqa: E402


def launch_cost_us() -> dict:
    """CPU microseconds per launch, queue kept busy so nothing waits on the GPU."""
    from tuneforge.kernels.rank_update import launch_rank_update_

    y = torch.zeros(16, 64, device="cuda", dtype=torch.bfloat16)
    xa = torch.zeros(16, 16, device="cuda", dtype=torch.bfloat16)
    b_t = torch.zeros(16, 64, device="cuda", dtype=torch.bfloat16)
    costs = {}
    for name, launch in [("triton rank_update_", lambda: launch_rank_update_(y, xa, b_t, 0.5)),
                         ("torch add_", lambda: y.add_(1.0)),
                         ("torch addmm_", lambda: y.addmm_(xa, b_t, alpha=0.5))]:
        for _ in range(50):
            launch()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(2000):
            launch()
        costs[name] = round((time.perf_counter() - start) / 2000 * 1e6, 2)
        torch.cuda.synchronize()
    return costs


def sync_sites(step) -> dict:
    """Where one step makes the host wait for the GPU: file:line -> count, from torch's sync debug mode.

    A launch-bound step only hides its CPU cost behind the GPU if the CPU can run ahead; every
    synchronising call (.item(), .cpu(), nonzero, a blocking copy) drains the queue instead."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    sites = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                                if "synchroniz" in str(w.message))
    return dict(sites.most_common(20))


def enqueue_and_wall_ms(step, steps: int = 5) -> dict:
    """CPU time to issue a step (no sync) against wall time per step with the GPU drained.

    enqueue ~ wall: the GPU waits on Python (launch-bound); enqueue << wall: GPU-bound."""
    torch.cuda.synchronize()
    issue, start = [], time.perf_counter()
    for _ in range(steps):
        begin = time.perf_counter()
        step()
        issue.append(time.perf_counter() - begin)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / steps
    return {"enqueue_ms": round(sorted(issue)[len(issue) // 2] * 1e3, 1), "wall_ms": round(wall * 1e3, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--stack", default="tuneforge")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args()
    print("launch cost (CPU us per launch):", launch_cost_us(), flush=True)
    step = warmed_up_step(args.stack, args.model, args.batch, args.seq)
    print("synchronising calls in one step:", sync_sites(step) or "none", flush=True)
    print("per step:", enqueue_and_wall_ms(step), flush=True)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    profiler.disable()
    wall = (time.perf_counter() - start) / args.steps * 1e3
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    text.write(f"{args.stack} {Path(args.model).name}: {wall:.1f} ms per step under cProfile\n")
    stats.sort_stats("tottime").print_stats(45)
    stats.sort_stats("cumulative").print_stats(60)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"cpu-{args.stack}-{Path(args.model).name}.txt").write_text(text.getvalue())
    print(text.getvalue()[:9000])


if __name__ == "__main__":
    main()
