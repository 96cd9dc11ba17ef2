"""One stack, one process: train a random-initialised shape in NF4 + LoRA and report speed/memory.

Stacks (the same loop, data, seed and LoRA config for each):
  hf         transformers + peft LoRA + bitsandbytes NF4 + standard gradient checkpointing + SDPA
             + torch AdamW (the usual QLoRA recipe: prepare_model_for_kbit_training)
  liger      hf + Liger-Kernel's patches for the family (fused linear cross-entropy, RMSNorm, SwiGLU, RoPE)
  tuneforge  FastLanguageModel (kernels, offloaded checkpointing, fused loss) + tuneforge's optimiser
  unsloth    unsloth.FastLanguageModel, where it can be imported

Prints one JSON line (prefix RESULT) with tokens/s, peak allocated / reserved GiB, step-1 loss,
and MFU = (4 * params * tokens + attention FLOPs) / time / bf16 peak.

  python bench/throughput.py --stack tuneforge --model /tmp/llama-3.1-8b --batch 2 --seq 2048
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, SXM


def load_stack(stack: str, model_dir: str, seq: int, checkpointing: str):
    import torch

    if stack == "unsloth":
        # Unsloth's own bundle (bench/device_prepare_unsloth.sh: trl 1.15, datasets 4) goes before
        # ours on the path; no network on the device, so the Hub is off.
        site = os.environ.get("TUNEFORGE_BENCH_UNSLOTH_SITE", "/tmp/unsloth-site")
        if Path(site).is_dir():
            sys.path.insert(0, site)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import unsloth  # noqa: F401  (must be imported before transformers)
        from unsloth import FastLanguageModel as UnslothModel

        model, _ = UnslothModel.from_pretrained(model_dir, max_seq_length=seq, load_in_4bit=True,
                                                dtype=torch.bfloat16)
        model = UnslothModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, target_modules=SEVEN,
                                            use_gradient_checkpointing="unsloth", random_state=3407)
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    if stack == "tuneforge":
        # TUNEFORGE_BENCH_SRC: another source tree (e.g. an older commit's src) for before/after runs.
        sys.path.insert(0, os.environ.get("TUNEFORGE_BENCH_SRC") or str(Path(__file__).resolve().parents[1] / "src"))
        from tuneforge import FastLanguageModel
        from tuneforge.train.optim import build_optimizer

        if os.environ.get("TUNEFORGE_BENCH_ADDMM") == "1":  # A/B: cuBLAS addmm_ for the rank-r updates
            import tuneforge.kernels.lora as lora_kernels
            import tuneforge.kernels.lora_group as lora_group

            def addmm_update(y, xa, b_t, scale):
                return y.addmm_(xa, b_t.t(), alpha=scale)

            lora_kernels.rank_update_ = lora_group.rank_update_ = addmm_update

        model, _ = FastLanguageModel.from_pretrained(model_dir, max_seq_length=seq, load_in_4bit=True,
                                                     dtype=torch.bfloat16)
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, target_modules=SEVEN,
                                                 use_gradient_checkpointing=checkpointing, random_state=3407)
        optimizer = build_optimizer(model, optim=os.environ.get("TUNEFORGE_BENCH_OPTIM", "adamw_8bit"),
                                    learning_rate=2e-4)
        return model, optimizer
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if stack == "liger":
        from liger_kernel.transformers import _apply_liger_kernel

        config = json.loads((Path(model_dir) / "config.json").read_text())
        _apply_liger_kernel(config["model_type"])
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, attn_implementation="sdpa", device_map={"": 0},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=torch.bfloat16),
    )
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                 gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(3407)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=SEVEN,
                                                       task_type="CAUSAL_LM"))
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)


def longtail_lengths(count: int, longest: int, seed: int = 7) -> list[int]:
    """Sample lengths as chat datasets have them: log-normal, median 256 tokens, a long tail up to
    `longest` (sigma 1.0 puts ~5% of samples above 1,300 tokens)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    draws = torch.exp(torch.randn(count, generator=generator) * 1.0 + math.log(256))
    return [int(min(max(x, 16), longest)) for x in draws.tolist()]


def longtail_batches(vocab: int, batch: int, seq: int, packed: bool, samples: int) -> list[dict]:
    """The same samples, two ways. padded: `batch` samples per step in dataset order, right-padded to
    the longest of the step, pads masked out of attention and loss (what a default collator does).
    packed: padding-free rows of up to batch x seq tokens (best fit decreasing), positions restarting
    at each sample (tuneforge.data.packing). Returns model kwargs on the GPU."""
    import torch

    from tuneforge.data.packing import PaddingFreeCollator, best_fit_decreasing

    lengths = longtail_lengths(samples, seq)
    generator = torch.Generator().manual_seed(1234)
    rows = [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]
    batches = []
    if packed:
        collate = PaddingFreeCollator(return_flash_kwargs=False)
        for members in best_fit_decreasing(lengths, batch * seq):
            batches.append(collate([{"input_ids": rows[i]} for i in members]))
    else:
        for start in range(0, samples, batch):
            group = rows[start:start + batch]
            width = max(len(r) for r in group)
            ids = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros(len(group), width, dtype=torch.long)
            for i, r in enumerate(group):
                ids[i, :len(r)] = torch.tensor(r)
                mask[i, :len(r)] = 1
            batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return [{k: v.cuda() if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]


def count_params(model) -> int:
    total = 0
    for parameter in model.parameters():
        state = getattr(parameter, "quant_state", None)
        total += int(math.prod(state.shape)) if state is not None else parameter.numel()
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stack", required=True, choices=["hf", "liger", "tuneforge", "unsloth"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--checkpointing", default="unsloth", help="tuneforge only: unsloth/offload or standard")
    parser.add_argument("--label", default="")
    parser.add_argument("--data", choices=["random", "padded", "packed"], default="random",
                        help="random: full rows of random tokens; padded/packed: --samples long-tailed samples "
                             "(longtail_batches), tokens/s counts real tokens only")
    parser.add_argument("--samples", type=int, default=256)
    args = parser.parse_args()
    if args.data != "random":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

    import torch

    torch.cuda.reset_peak_memory_stats()
    load_start = time.perf_counter()
    model, optimizer = load_stack(args.stack, args.model, args.seq, args.checkpointing)
    load_seconds = time.perf_counter() - load_start
    model.train()
    config = model.config
    vocab = config.vocab_size
    if args.data == "random":
        generator = torch.Generator().manual_seed(1234)
        batches = [{"input_ids": ids, "labels": ids} for ids in
                   (torch.randint(0, vocab, (args.batch, args.seq), generator=generator).cuda() for _ in range(4))]
        steps = args.warmup + args.steps
    else:  # one pass over the samples, after warm-up steps on its first batches
        batches = longtail_batches(vocab, args.batch, args.seq, args.data == "packed", args.samples)
        steps = args.warmup + len(batches)

    def batch_at(step: int) -> dict:
        return batches[step % len(batches)] if args.data == "random" else (
            batches[step] if step < args.warmup else batches[step - args.warmup])

    # TUNEFORGE_CUDA_GRAPHS=1 (tuneforge stack, random data): forward + backward replayed from a CUDA
    # graph captured at the first step (train/graphed_step.py); the capture counts in step 1's time.
    graphed = None
    capture_s = None
    if args.stack == "tuneforge" and args.data == "random":
        try:  # an older tree under TUNEFORGE_BENCH_SRC may have no such switch
            from tuneforge import switches

            graphed = getattr(switches.current(), "cuda_graphs", None)
        except ImportError:
            pass
    losses, times, real_tokens = [], [], []
    error = None
    try:
        for step in range(steps):
            batch = batch_at(step)
            real_tokens.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel())
            torch.cuda.synchronize()
            start = time.perf_counter()
            if graphed is True:
                from tuneforge.train.graphed_step import GraphedStep

                graphed = GraphedStep(model)
            if graphed:
                loss = graphed.step(batch)
                capture_s = round(graphed.capture_seconds, 2)
            else:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(**batch).loss
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            losses.append(float(loss))
    except torch.OutOfMemoryError as oom:
        error = f"OOM: {str(oom).splitlines()[0][:160]}"

    timed = times[args.warmup:]
    tokens = args.batch * args.seq
    result = {
        "stack": args.stack, "label": args.label, "model": Path(args.model).name, "batch": args.batch,
        "seq": args.seq, "device": torch.cuda.get_device_name(), "load_s": round(load_seconds, 1),
        "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3),
        "loss_step1": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "error": error, "graph_capture_s": capture_s,
    }
    if timed and error is None and args.data != "random":
        # Real tokens (pads excluded) over the whole pass: padding's cost shows as lost throughput.
        total = sum(timed)
        counted = real_tokens[args.warmup:]
        result.update(data=args.data, samples=args.samples, steps=len(timed),
                      tokens_per_s=round(sum(counted) / total, 1), pass_s=round(total, 2),
                      finite=all(math.isfinite(x) for x in losses))
    elif timed and error is None:
        median = statistics.median(timed)
        params = count_params(model)
        layers, hidden = config.num_hidden_layers, config.hidden_size
        # Causal attention: QK^T and AV, forward + backward (2x), half the square.
        attention_flops = 6 * args.batch * args.seq ** 2 * hidden * layers
        flops = 4 * params * tokens + attention_flops
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in result["device"]), 989.0) * 1e12
        result.update(
            tokens_per_s=round(tokens / median, 1), step_s_median=round(median, 4),
            step_s_spread=round(max(timed) - min(timed), 4), params=params,
            mfu=round(flops / median / peak, 4), finite=all(math.isfinite(x) for x in losses),
        )
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
