"""Decode speed: plain transformers `generate` vs tuneforge (`FastLanguageModel.for_inference`),
both on the same NF4 model, greedy, KV cache on, batch 1 and 8; prints tokens/s and a table.

  python bench/decode.py --model /tmp/llama-3.2-1b                      # every stack x batch
  python bench/decode.py --shape llama-3.1-8b --folder /dev/shm/llama-3.1-8b --out $OUT
  python bench/decode.py --stack tuneforge --model DIR --batch 8      # one stack, one RESULT line per batch

hf is transformers' `generate` on the bitsandbytes NF4 model (SDPA, its dynamic KV cache).
tuneforge is `for_inference`'s `generate`: a static KV cache, the prompt prefilled eagerly, then
every decode step replayed from one captured CUDA graph (tuneforge.inference); the "path" column
says what actually ran (a fallback to transformers' generate would show there).

Each stack runs in its own process (loading the model once for all batch sizes), so one stack's
allocator state and compiled kernels never flatter the other. Prompts are random token ids (a
fixed seed, the same for both stacks); `min_new_tokens` = `max_new_tokens`, so a random model's
EOS never ends a run early and both stacks decode the same number of tokens. tokens/s = batch x
new tokens / wall time of `generate` (the median of --repeats runs after one warm-up), i.e. the
prompt's prefill is included, as a user sees it. The first run's tokens are compared across stacks ("same tokens"): greedy decoding
of the same model should agree except where two logits are within rounding of each other.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STACKS = ("hf", "tuneforge")


def load(stack: str, model_dir: str, four_bit: bool):
    import torch

    dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    if stack == "tuneforge":
        sys.path.insert(0, str(HERE.parent / "src"))
        from tuneforge import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(model_dir, load_in_4bit=four_bit, dtype=dtype,
                                                     max_seq_length=4096)
        return FastLanguageModel.for_inference(model)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype) if four_bit else None
    device = {"": 0} if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, quantization_config=quantization,
                                                device_map=device, attn_implementation="sdpa").eval()


def run_one(model, stack: str, model_dir: str, batch: int, prompt_len: int, new_tokens: int, repeats: int,
            four_bit: bool) -> dict:
    import torch

    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (batch, prompt_len), generator=generator).to(device)
    mask = torch.ones_like(ids)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def generate(n: int):
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, use_cache=True, pad_token_id=pad)

    generate(8)  # warm-up: CUDA context, kernel compilation, cuBLAS handles (tuneforge: the graph capture)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, first = [], None
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        out = generate(new_tokens)
        sync()
        times.append(time.perf_counter() - start)
        first = out[:, prompt_len:].tolist() if first is None else first
    seconds = statistics.median(times)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {
        "stack": stack, "model": Path(model_dir).name, "batch": batch, "prompt": prompt_len, "new": new_tokens,
        "four_bit": four_bit, "tokens_per_s": round(batch * new_tokens / seconds, 1), "seconds": round(seconds, 3),
        "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "kernels": getattr(getattr(inner, "tuneforge", None), "kernels", None),
        "path": getattr(getattr(inner, "tuneforge", None), "generate_path", None) or "transformers generate",
        "tokens": first,
    }


def run_process(stack: str, args, batches: list[int]) -> list[dict]:
    """One process for `stack`: the model loaded once, one RESULT line per batch size."""
    command = [sys.executable, str(Path(__file__).resolve()), "--stack", stack, "--model", str(args.model),
               "--batch", ",".join(map(str, batches)), "--prompt-len", str(args.prompt_len),
               "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)] + \
        (["--no-4bit"] if args.no_4bit else [])
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
        stdout, stderr, why = done.stdout, done.stderr, None
    except subprocess.TimeoutExpired as expired:
        stdout, stderr, why = expired.stdout or "", expired.stderr or "", f"timeout after {args.timeout} s"
        stdout, stderr = (x.decode() if isinstance(x, bytes) else x for x in (stdout, stderr))
    found = {r["batch"]: r for r in (json.loads(line[len("RESULT "):]) for line in stdout.splitlines()
                                     if line.startswith("RESULT "))}
    tail = " | ".join((stderr or stdout).strip().splitlines()[-6:])[-600:]
    return [found.get(batch) or {"stack": stack, "batch": batch, "error": why or tail} for batch in batches]


def table(results: list[dict]) -> str:
    rows = ["| model | batch | stack | tokens/s | vs hf | same tokens as hf | peak alloc GiB | path |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        base = next((b for b in results if b["stack"] == "hf" and b["batch"] == r["batch"] and "tokens_per_s" in b),
                    None)
        if "error" in r:
            rows.append(f"| - | {r['batch']} | {r['stack']} | {r['error']} | - | - | - | - |")
            continue
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        same = "-"
        if base and base.get("tokens") and r.get("tokens"):
            pairs = [(a, b) for row_a, row_b in zip(base["tokens"], r["tokens"]) for a, b in zip(row_a, row_b)]
            same = f"{100 * sum(a == b for a, b in pairs) / len(pairs):.0f}%"
        rows.append(f"| {r['model']} | {r['batch']} | {r['stack']} | {r['tokens_per_s']:,.1f} | {ratio} | {same} | "
                    f"{r.get('peak_alloc_gib') or '-'} | {r.get('path') or '-'} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="HF model folder (bf16/fp32 weights; quantised to NF4 on load)")
    parser.add_argument("--shape", help="instead of --model: random-initialise a shape from bench/shapes.py")
    parser.add_argument("--folder", type=Path, help="where --shape is saved (default /tmp/<shape>)")
    parser.add_argument("--stack", choices=STACKS, help="run one stack in this process (else: all, one process each)")
    parser.add_argument("--batch", default="1,8", help="batch sizes, comma-separated")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-4bit", action="store_true", help="16-bit weights instead of NF4")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per stack process")
    parser.add_argument("--out", type=Path, help="folder for results.jsonl and decode.md")
    args = parser.parse_args()
    if args.shape:
        sys.path.insert(0, str(HERE))
        from shapes import make_shape

        args.model = str(make_shape(args.shape, args.folder or Path("/tmp") / args.shape))
    if not args.model:
        parser.error("give --model or --shape")
    batches = [int(b) for b in args.batch.split(",")]
    if args.stack:
        model = load(args.stack, args.model, not args.no_4bit)
        for batch in batches:
            result = run_one(model, args.stack, args.model, batch, args.prompt_len, args.new_tokens, args.repeats,
                             not args.no_4bit)
            print("RESULT " + json.dumps(result), flush=True)
        return 0
    by_stack = {}
    for stack in STACKS:
        by_stack[stack] = run_process(stack, args, batches)
        for result in by_stack[stack]:
            print(json.dumps({k: v for k, v in result.items() if k != "tokens"}), flush=True)
    results = [by_stack[stack][i] for i in range(len(batches)) for stack in STACKS]
    text = table(results)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with (args.out / "results.jsonl").open("a") as handle:
            for result in results:
                handle.write(json.dumps({k: v for k, v in result.items() if k != "tokens"}) + "\n")
        (args.out / "decode.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
