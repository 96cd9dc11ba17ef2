"""QLoRA on a Qwen3-30B-A3B-shaped mixture of experts: tuneforge vs transformers + peft, one GPU.

The shape is Qwen3-30B-A3B's (hidden 2048, 32 heads / 4 KV heads of 128, 128 experts of
intermediate 768, 8 routed per token, renormalised; vocab 151,936) with `--layers` of its 48
decoder layers (default 12: a quarter of the model, so that the transformers + peft baseline,
whose experts stay bf16 because bitsandbytes quantises nn.Linear only, fits next to its
activations). Weights are random (no download on the device); routing of a random router is
near-uniform, which is the balanced case a trained router aims for.

Both stacks load the same bf16 safetensors folder in 4-bit (NF4, double quantisation, bf16
compute) and train LoRA r=16 on q/k/v/o and on the stacked experts (peft's target_parameters:
gate_up_proj, down_proj) with gradient checkpointing, torch AdamW on the LoRA parameters, rows of
--seq tokens (--batch of them, default 2 x 2048):

  tuneforge  FastLanguageModel.from_pretrained(load_in_4bit=True): attention NF4 (bitsandbytes),
             experts NF4 (models/moe.py), LoRA on experts through kernels/moe.py (factored, grouped),
             offloaded checkpointing ("unsloth"), chunked cross-entropy
  hf         transformers + bitsandbytes NF4 (attention only; experts bf16) + peft (its ParamWrapper
             forms W + s B A for every expert stack each forward) + non-reentrant checkpointing

Reported per stack: memory after load, peak memory of the timed steps (torch.cuda.max_memory_allocated),
tokens/s over --steps steps after --warmup, and the losses. Each stack runs in its own process.

  python bench/moe.py --layers 12 --out $OUT            (writes $OUT/moe.json and prints a table)
  python bench/moe.py --one tuneforge --folder /dev/shm/qwen3-30b-a3b-12l   (one stack, JSON line)
  python bench/moe.py --tiny --layers 2 --seq 64 --steps 2 --folder /tmp/moe-tiny   (CPU smoke test)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SHAPE = dict(
    hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_attention_heads=32,
    num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
    vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_parameters=dict(rope_type="default", rope_theta=1000000.0), decoder_sparse_step=1,
)
# --tiny: the same code on a small model (hidden 64, 8 experts), runnable on the CPU as a smoke test.
TINY = dict(SHAPE, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2, vocab_size=512)
DEVICE = "cuda"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["gate_up_proj", "down_proj"]


def make_folder(folder: Path, layers: int, shape: dict) -> Path:
    """Random-initialise the shape with `layers` layers on the GPU in bf16 and save it (once)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    if (folder / "config.json").is_file():
        return folder
    config = Qwen3MoeConfig(num_hidden_layers=layers, **shape)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return folder


def load(stack: str, folder: str, seq: int, rank: int):
    import torch

    if stack == "tuneforge":
        from tuneforge import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(folder, max_seq_length=seq, load_in_4bit=True,
                                                     dtype=torch.bfloat16)
        loaded = _allocated()
        model = FastLanguageModel.get_peft_model(model, r=rank, lora_alpha=rank, target_modules=TARGETS,
                                                 target_parameters=EXPERTS, use_gradient_checkpointing="unsloth")
        return model, loaded
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=quantization,
                                                 device_map=DEVICE, attn_implementation="sdpa")
    loaded = _allocated()
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS,
                                                       target_parameters=EXPERTS, task_type="CAUSAL_LM"))
    return model, loaded


def _allocated() -> int:
    import torch

    return torch.cuda.memory_allocated() if DEVICE == "cuda" else 0


def _sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def run_one(args) -> dict:
    import torch

    torch.manual_seed(0)
    model, loaded = load(args.one, args.folder, args.seq, args.rank)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    generator = torch.Generator(device=DEVICE).manual_seed(1)
    losses, times = [], []
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        ids = torch.randint(8, vocab, (args.batch, args.seq), device=DEVICE, generator=generator)
        _sync()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        losses.append(round(loss.item(), 4))
    tokens = args.batch * args.seq * len(times)
    return dict(stack=args.one, layers=args.layers, batch=args.batch, seq=args.seq, rank=args.rank,
                loaded_gib=round(loaded / 2**30, 2),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEVICE == "cuda" else None,
                tokens_per_s=round(tokens / sum(times), 1), step_s=round(sum(times) / len(times), 3),
                trainable=sum(p.numel() for p in params), losses=losses,
                gpu=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
                kernels=list(getattr(model.get_base_model(), "tuneforge_lora_kernels", [])))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--stacks", default="tuneforge,hf")
    parser.add_argument("--folder", default=None, help="default /dev/shm/qwen3-30b-a3b-<layers>l")
    parser.add_argument("--one", choices=["tuneforge", "hf"], help="run one stack in this process, print JSON")
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--tiny", action="store_true", help="a small model of the same family, on the CPU if no GPU")
    args = parser.parse_args(argv)
    global DEVICE
    import torch

    DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    args.folder = args.folder or f"/dev/shm/qwen3-30b-a3b-{args.layers}l{'-tiny' if args.tiny else ''}"
    if args.one:
        try:
            print(json.dumps(run_one(args)), flush=True)
        except Exception as error:  # noqa: BLE001 - an out-of-memory baseline is a result too
            print(json.dumps(dict(stack=args.one, layers=args.layers, error=f"{type(error).__name__}: "
                                  f"{str(error).splitlines()[0][:200]}")), flush=True)
        return 0
    make_folder(Path(args.folder), args.layers, TINY if args.tiny else SHAPE)
    rows = []
    for stack in args.stacks.split(","):
        command = [sys.executable, __file__, "--one", stack, "--folder", args.folder,
                   *(f"--{k}={getattr(args, k)}" for k in ("layers", "batch", "seq", "rank", "warmup", "steps"))]
        if args.tiny:
            command.append("--tiny")
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        rows.append(json.loads(lines[-1]) if lines else dict(stack=stack, error=done.stderr.strip()[-400:]))
        print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "moe.json").write_text(json.dumps(rows, indent=1))
    print(f"\nQwen3-30B-A3B shape, {args.layers} of 48 layers, 4-bit, LoRA r={args.rank} on q/k/v/o + experts, "
          f"{args.batch} x {args.seq} tokens")
    print("| stack | loaded GiB | peak GiB | tokens/s | s/step | first / last loss |\n|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['stack']} | - | - | - | - | {row['error'][:120]} |")
        else:
            print(f"| {row['stack']} | {row['loaded_gib']} | {row['peak_gib']} | {row['tokens_per_s']} | "
                  f"{row['step_s']} | {row['losses'][0]} / {row['losses'][-1]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
