"""`tuneforge plan`'s estimate against the GPU: estimated vs measured peak memory and step time.

For each shape (random-initialised from its published config, bench/shapes.py) the model is loaded
once as `tuneforge train` loads it (NF4, LoRA r=16 on the seven projections, offloaded
checkpointing, kernels, 8-bit AdamW); each batch x seq then runs two real steps on random tokens
(the first allocates the optimizer state) with the peak counter reset, and its estimate comes from
tuneforge.planning.estimate for the same set-up. Target: within 10%.

  python bench/plan_check.py --out $OUT                       # 1B and 8B, the default grid (~5 min)
  python bench/plan_check.py --shapes llama-3.2-1b --grid 4x2048,1x32768

Writes <out>/plan_check.md (the table) and <out>/plan_check.jsonl (one line per point).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from shapes import make_shape, shape_config  # noqa: E402

GiB = 2**30
DEFAULT_GRID = {
    "llama-3.2-1b": "1x2048,4x2048,8x2048,1x8192,1x32768",
    "llama-3.1-8b": "1x2048,2x2048,4x2048,1x8192,1x32768",
}


def load(model_dir: Path, seq: int):
    import torch

    from tuneforge import FastLanguageModel
    from tuneforge.train.optim import build_optimizer

    model, _ = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=seq, load_in_4bit=True,
                                                 dtype=torch.bfloat16)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0,
                                             use_gradient_checkpointing="unsloth", random_state=3407)
    model.train()
    return model, build_optimizer(model, optim="adamw_8bit", learning_rate=2e-4)


def measure(model, optimizer, vocab: int, batch: int, seq: int) -> dict:
    """Peak allocated / reserved over two steps, and the second step's time; error on OOM."""
    import torch

    optimizer.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, vocab, (batch, seq), device="cuda")
    times = []
    try:
        for _ in range(2):
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError as error:
        return {"error": f"OOM: {str(error).splitlines()[0][:120]}"}
    finally:
        del ids
    return {"measured_gib": torch.cuda.max_memory_allocated() / GiB,
            "reserved_gib": torch.cuda.max_memory_reserved() / GiB, "measured_s": times[-1]}


def estimated(name: str, batch: int, seq: int) -> dict:
    from tuneforge.planning import detect_device
    from tuneforge.planning.estimate import ModelFacts, RunSetup, estimate, utilisation_for

    facts = ModelFacts.from_config(shape_config(name))
    device = detect_device()
    device.utilisation = utilisation_for(facts.total_params, "cuda")
    result = estimate(facts, RunSetup(batch=batch, seq=seq, mean_seq=seq), device)
    return {"estimated_gib": result.peak / GiB, "estimated_total_gib": result.device_total / GiB,
            "host_gib": result.host_offloaded / GiB, "estimated_s": result.seconds_per_step,
            "phase": max(result.phases, key=result.phases.get), "device": device.name}


def table(rows: list[dict]) -> str:
    lines = ["| shape | batch x seq | estimated GiB | measured GiB (alloc) | error | reserved GiB | est. s/step | "
             "measured s/step | peak phase |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['batch']} x {r['seq']} | {r['estimated_gib']:.2f} | {r['error']} "
                         f"| - | - | {r['estimated_s']:.3f} | - | {r['phase']} |")
            continue
        error = 100 * (r["estimated_gib"] / r["measured_gib"] - 1)
        lines.append(f"| {r['shape']} | {r['batch']} x {r['seq']} | {r['estimated_gib']:.2f} | {r['measured_gib']:.2f} "
                     f"| {error:+.1f}% | {r['reserved_gib']:.2f} | {r['estimated_s']:.3f} | {r['measured_s']:.3f} "
                     f"| {r['phase']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="llama-3.2-1b,llama-3.1-8b")
    parser.add_argument("--grid", help="batch x seq points for every shape, e.g. 1x2048,4x2048 (default: per shape)")
    parser.add_argument("--shape-dir", default="/dev/shm")
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("plan_check measures GPU memory: run it on a CUDA machine")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.shapes.split(","):
        points = [tuple(int(v) for v in p.split("x")) for p in (args.grid or DEFAULT_GRID[name]).split(",")]
        model_dir = make_shape(name, Path(args.shape_dir) / name)
        model, optimizer = load(model_dir, max(seq for _, seq in points))
        vocab = model.config.vocab_size
        for batch, seq in points:
            row = {"shape": name, "batch": batch, "seq": seq, **estimated(name, batch, seq),
                   **measure(model, optimizer, vocab, batch, seq)}
            rows.append(row)
            with (out / "plan_check.jsonl").open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
        del model, optimizer
        torch.cuda.empty_cache()
    text = table(rows)
    (out / "plan_check.md").write_text(text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    main()
