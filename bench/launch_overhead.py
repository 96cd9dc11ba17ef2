"""CPU microseconds per kernel launch (issue #16): Triton's `kernel[grid](...)` vs our cached
`launch(kernel, grid, ...)` (src/tuneforge/kernels/launcher.py) vs a torch elementwise op.

Tiny inputs (4 tokens), so that the GPU finishes each kernel before the CPU issues the next and
what is timed is the CPU's cost of issuing: launches are issued in batches of --batch (fewer than
the launch queue holds, so the CPU never waits for a free slot), the host times each batch without
synchronising, then synchronises; the median over --repeats batches is reported, with the GPU
time per kernel (CUDA events over the same batch) to show that the GPU was not the limit. Kernels:
the RMSNorm forward (14 arguments), the SwiGLU forward (5) and backward (7), each with the
arguments its public function passes. Outputs of the two launch paths are compared bit for bit.

  python bench/launch_overhead.py --out $OUT      # prints a table, writes $OUT/launch_overhead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def cases(tokens: int, hidden: int, intermediate: int):
    """(name, kernel, grid, args, kwargs, outputs, torch op of the same size) per kernel."""
    import triton

    from tuneforge.kernels._utils import elementwise_launch, row_tile_launch
    from tuneforge.kernels.rms_norm import _rms_norm_fwd_kernel
    from tuneforge.kernels.swiglu import _swiglu_bwd_kernel, _swiglu_fwd_kernel

    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x, weight, y = torch.randn(tokens, hidden, **bf16), torch.randn(hidden, **bf16), torch.empty(tokens, hidden, **bf16)
    rstd = torch.empty(tokens, device="cuda", dtype=torch.float32)
    block, rows, warps = row_tile_launch(hidden)
    rms = ("rms_norm fwd", _rms_norm_fwd_kernel, (triton.cdiv(tokens, rows),),
           (x, weight, y, rstd, x.stride(0), y.stride(0), tokens, hidden, 1e-6, 0.0),
           dict(BLOCK=block, ROWS=rows, CAST_BEFORE_WEIGHT=True, EVEN=block == hidden and tokens % rows == 0,
                num_warps=warps),
           (y, rstd), lambda: torch.mul(x, 0.5, out=y))
    n = tokens * intermediate
    gate, up, out, dout = (torch.randn(n, **bf16) for _ in range(4))
    dgate, dup = torch.empty(n, **bf16), torch.empty(n, **bf16)
    block, warps = elementwise_launch(n)
    grid = (triton.cdiv(n, block),)
    swiglu_fwd = ("swiglu fwd", _swiglu_fwd_kernel, grid, (gate, up, out, n), dict(BLOCK=block, num_warps=warps),
                  (out,), lambda: torch.mul(gate, up, out=out))
    swiglu_bwd = ("swiglu bwd", _swiglu_bwd_kernel, grid, (dout, gate, up, dgate, dup, n),
                  dict(BLOCK=block, num_warps=warps), (dgate, dup), lambda: torch.mul(gate, up, out=dgate))
    return [rms, swiglu_fwd, swiglu_bwd]


def cpu_us_per_call(call, batch: int, repeats: int) -> tuple[float, float]:
    """(median CPU µs to issue one call, GPU µs per call) over `repeats` batches of `batch` calls."""
    for _ in range(batch):  # compile, fill caches, warm the allocator
        call()
    torch.cuda.synchronize()
    cpu, gpu = [], []
    for _ in range(repeats):
        start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start_event.record()
        start = time.perf_counter()
        for _ in range(batch):
            call()
        cpu.append((time.perf_counter() - start) / batch * 1e6)
        end_event.record()
        torch.cuda.synchronize()
        gpu.append(start_event.elapsed_time(end_event) * 1e3 / batch)
    return statistics.median(cpu), statistics.median(gpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=256, help="launches issued between synchronisations")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--out", default="bench-out", help="folder for launch_overhead.json")
    args = parser.parse_args()

    import triton

    from tuneforge.kernels import launcher
    from tuneforge.kernels.launcher import launch

    if launcher._BLOCKER is not None:
        raise SystemExit(f"the cached launch path is off on this machine: {launcher._BLOCKER}")
    results = []
    for name, kernel, grid, kargs, kw, outputs, torch_op in cases(args.tokens, args.hidden, args.intermediate):
        plain = cpu_us_per_call(lambda: kernel[grid](*kargs, **kw), args.batch, args.repeats)
        expected = [o.clone() for o in outputs]
        for o in outputs:
            o.fill_(float("nan"))
        cached = cpu_us_per_call(lambda: launch(kernel, grid, *kargs, **kw), args.batch, args.repeats)
        torch.cuda.synchronize()
        equal = all(torch.equal(o, e) for o, e in zip(outputs, expected))
        op = cpu_us_per_call(torch_op, args.batch, args.repeats)
        results.append({
            "kernel": name, "arguments": len(kargs) + len(kw),
            "plain_cpu_us": round(plain[0], 2), "launch_cpu_us": round(cached[0], 2),
            "torch_op_cpu_us": round(op[0], 2),
            "plain_gpu_us": round(plain[1], 2), "launch_gpu_us": round(cached[1], 2),
            "torch_op_gpu_us": round(op[1], 2),
            "speedup": round(plain[0] / cached[0], 2), "bit_equal": equal,
            "cached_specializations": len(launcher._PLANS[id(kernel)].cache),
        })

    print("| kernel | args | kernel[grid] µs | launch µs | speedup | torch op µs "
          "| GPU µs/kernel (plain / launch / op) | equal |")
    print("|---" * 8 + "|")
    for r in results:
        print(f"| {r['kernel']} | {r['arguments']} | {r['plain_cpu_us']} | {r['launch_cpu_us']} | {r['speedup']}x "
              f"| {r['torch_op_cpu_us']} | {r['plain_gpu_us']} / {r['launch_gpu_us']} / {r['torch_op_gpu_us']} "
              f"| {r['bit_equal']} |")
    report = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "tokens": args.tokens, "batch": args.batch, "repeats": args.repeats, "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "launch_overhead.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out / 'launch_overhead.json'}")
    if not all(r["bit_equal"] for r in results):
        raise SystemExit("launch and kernel[grid] gave different outputs")


if __name__ == "__main__":
    main()
