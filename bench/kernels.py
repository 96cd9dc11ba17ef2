"""Per-kernel GPU timing: our Triton kernel vs the eager PyTorch reference vs torch.compile of it.

For each op, forward and forward+backward, at Llama-3.1-8B sizes (8192 tokens = batch 4 x 2048):
median time (triton.testing.do_bench), achieved GB/s for the memory-bound ops (bytes = each input
read once + each output written once, the fewest the op must move) and that as a fraction of the
card's copy bandwidth, measured in the same run with a large device-to-device copy.

  python bench/kernels.py --out $OUT

NF4 matmul for decode-sized inputs (1 and 8 rows against the 8B projections): tuneforge's
`nf4_matmul` vs bitsandbytes' dequantize_4bit + matmul vs bitsandbytes' matmul_4bit (what a
Linear4bit runs without gradients), ms and GB/s of the packed weight (N x K / 2 bytes); with
--sweep also a grid of launch configs for nf4_matmul (the best one per case is printed):

  python bench/kernels.py --only nf4_matmul [--sweep] --out $OUT

RMSNorm forward launch sweep (rows per program x warps, through TUNEFORGE_RMS_NORM_FWD) at
8192 tokens and the hidden sizes of SmolLM2, Llama-3.2-1B, Qwen2.5-7B, Llama-3.1-8B, Llama-70B,
bf16, against torch.compile of the reference and the built-in launch rule:

  python bench/kernels.py --only rms_norm --out $OUT
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

TOKENS, HIDDEN, INTERMEDIATE, VOCAB = 8192, 4096, 14336, 128256
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def do_bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    """GB/s of a large device-to-device copy (read + write), the practical ceiling."""
    source = torch.randn(512 * 2**20 // 4, device="cuda")
    target = torch.empty_like(source)
    ms = do_bench(lambda: target.copy_(source))
    return 2 * source.numel() * 4 / (ms * 1e-3) / 1e9


def save_results(out: Path, name: str, rows: list[dict], header: str, lines: list[str], footer: str) -> None:
    """<out>/<name>.jsonl (one row per line) and <out>/<name>.md (the table + footer), printed too."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    divider = "|" + "---|" * (header.count("|") - 1)
    text = "\n".join([header, divider, *lines]) + f"\n\n{footer}\n"
    (out / f"{name}.md").write_text(text)
    print(text)


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def cases():
    from tuneforge.kernels import cross_entropy, geglu, nf4, rms_norm, rope, swiglu

    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(TOKENS, HIDDEN, **bf16, requires_grad=True)
    w = torch.randn(HIDDEN, **bf16)
    yield ("rms_norm", lambda: rms_norm.rms_norm(x, w, 1e-5), lambda: rms_norm.reference_rms_norm(x, w, 1e-5),
           [x], nbytes(x, w) + nbytes(x), nbytes(x) * 2 + nbytes(x) + nbytes(w))

    gate = torch.randn(TOKENS, INTERMEDIATE, **bf16, requires_grad=True)
    up = torch.randn(TOKENS, INTERMEDIATE, **bf16, requires_grad=True)
    yield ("swiglu", lambda: swiglu.swiglu(gate, up), lambda: swiglu.reference_swiglu(gate, up), [gate, up],
           nbytes(gate, up, gate), nbytes(gate, up, gate) + nbytes(gate, up))
    yield ("geglu_tanh", lambda: geglu.geglu(gate, up, "tanh"), lambda: geglu.reference_geglu(gate, up, "tanh"),
           [gate, up], nbytes(gate, up, gate), nbytes(gate, up, gate) + nbytes(gate, up))

    # The kernel rotates q/k in place, in the projections' layout [B, S, H*D]; the reference
    # takes the per-head layout [B, H, S, D] and returns new tensors.
    q = torch.randn(4, 2048, HEADS * HEAD_DIM, **bf16, requires_grad=True)
    k = torch.randn(4, 2048, KV_HEADS * HEAD_DIM, **bf16, requires_grad=True)
    cos = torch.randn(4, 2048, HEAD_DIM, **bf16)
    sin = torch.randn(4, 2048, HEAD_DIM, **bf16)
    rope_bytes = 2 * nbytes(q, k) + nbytes(cos, sin)

    def heads(t):
        return t.unflatten(-1, (-1, HEAD_DIM)).transpose(1, 2)

    def rope_ours():
        # Autograd refuses to overwrite a leaf: the forward+backward timing rotates clones, so it
        # includes one copy of q and k that the model (rotating fresh projection outputs) never makes.
        if torch.is_grad_enabled():
            return rope.apply_rope(q.clone(), k.clone(), cos, sin, HEAD_DIM)
        return rope.apply_rope(q, k, cos, sin, HEAD_DIM)

    yield ("rope", rope_ours, lambda: rope.reference_apply_rope(heads(q), heads(k), cos, sin),
           [q, k], rope_bytes, 2 * rope_bytes)

    hidden = torch.randn(TOKENS, HIDDEN, **bf16, requires_grad=True)
    head = torch.randn(VOCAB, HIDDEN, **bf16) * 0.02
    labels = torch.randint(0, VOCAB, (TOKENS,), device="cuda")
    yield ("fused_linear_cross_entropy",
           lambda: cross_entropy.fused_linear_cross_entropy(hidden, head, labels),
           lambda: cross_entropy.reference_linear_cross_entropy(hidden, head, labels),
           [hidden], None, None)

    from tuneforge.kernels.rank_update import launch_rank_update_

    y = torch.randn(TOKENS, INTERMEDIATE, **bf16)
    xa = torch.randn(TOKENS, 16, **bf16)
    lora_b = torch.randn(INTERMEDIATE, 16, **bf16)
    yield ("lora_rank_update (y += s*XA@B^T)", lambda: launch_rank_update_(y, xa, lora_b, 0.5),
           lambda: y.addmm_(xa, lora_b.t(), alpha=0.5), [], 2 * nbytes(y), None)

    # Gemma-2-9B's attention (16 q / 8 kv heads of 256, cap 50), 2 x 2048 tokens: ours against
    # the eager soft-capped attention every Gemma 2 trained through before (fp32 scores per sample).
    from tuneforge.kernels import softcap_attention

    gq = torch.randn(2 * 2048, 16, 256, **bf16, requires_grad=True)
    gk = torch.randn(2 * 2048, 8, 256, **bf16, requires_grad=True)
    gv = torch.randn(2 * 2048, 8, 256, **bf16, requires_grad=True)
    cu = torch.tensor([0, 2048, 4096], dtype=torch.int32, device="cuda")
    yield ("softcap_attention (Gemma 2)",
           lambda: softcap_attention.softcap_attention(gq, gk, gv, cu, 2048, 256 ** -0.5, 50.0),
           lambda: softcap_attention.reference_softcap_attention(gq, gk, gv, cu, 2048, 256 ** -0.5, 50.0),
           [gq, gk, gv], None, None)

    import bitsandbytes as bnb

    dense = torch.randn(INTERMEDIATE, HIDDEN, **bf16)
    packed, state = bnb.functional.quantize_4bit(dense, quant_type="nf4", compress_statistics=True)
    yield ("nf4_dequantize", lambda: nf4.dequantize_nf4(packed, state, torch.bfloat16),
           lambda: bnb.functional.dequantize_4bit(packed, state), [], nbytes(packed) + nbytes(dense), None)


def run(out: Path) -> list[dict]:
    bandwidth = copy_bandwidth()
    rows = []
    for name, ours, reference, grads_of, forward_bytes, backward_bytes in cases():
        compiled = torch.compile(reference)
        row = {"kernel": name, "copy_gbps": round(bandwidth)}
        for label, fn in (("ours", ours), ("eager", reference), ("compiled", compiled)):
            with torch.no_grad():
                row[f"fwd_ms_{label}"] = round(do_bench(fn), 4)
            if grads_of:
                def step(fn=fn):
                    outputs = fn()
                    outputs = list(outputs) if isinstance(outputs, tuple) else [outputs]
                    torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])
                    for tensor in grads_of:
                        tensor.grad = None
                row[f"fwdbwd_ms_{label}"] = round(do_bench(step), 4)
        if forward_bytes:
            gbps = forward_bytes / (row["fwd_ms_ours"] * 1e-3) / 1e9
            row.update(fwd_gbps=round(gbps), fwd_frac_of_copy=round(gbps / bandwidth, 3))
        if backward_bytes and "fwdbwd_ms_ours" in row:
            gbps = (forward_bytes + backward_bytes) / (row["fwdbwd_ms_ours"] * 1e-3) / 1e9
            row.update(fwdbwd_gbps=round(gbps), fwdbwd_frac_of_copy=round(gbps / bandwidth, 3))
        rows.append(row)
        print(json.dumps(row), flush=True)
    save_results(
        out, "kernels", rows,
        "| kernel | fwd ours ms | eager | compiled | fwd+bwd ours ms | eager | compiled | GB/s (fwd) | of copy BW |",
        [f"| {r['kernel']} | {r['fwd_ms_ours']} | {r['fwd_ms_eager']} | {r['fwd_ms_compiled']} | "
         f"{r.get('fwdbwd_ms_ours', '-')} | {r.get('fwdbwd_ms_eager', '-')} | {r.get('fwdbwd_ms_compiled', '-')} | "
         f"{r.get('fwd_gbps', '-')} | {r.get('fwd_frac_of_copy', '-')} |" for r in rows],
        f"copy bandwidth measured: {bandwidth:.0f} GB/s on {torch.cuda.get_device_name()}")
    return rows


# --- NF4 matmul at decode sizes ---------------------------------------------------------------------

# (N, K) of Llama-3.1-8B's projections: q/o, gate/up, down, and k/v (a small N, where split-K matters).
NF4_SHAPES = ((HIDDEN, HIDDEN), (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE), (KV_HEADS * HEAD_DIM, HIDDEN))
NF4_ROWS = (1, 8)


def _nf4_sweep_configs(rows: int):
    from tuneforge.kernels.nf4_gemv import GemvConfig

    for use_dot in ((False, True) if rows > 1 else (False,)):
        for block_n, block_kb, num_warps in ((16, 128, 4), (32, 128, 4), (32, 256, 4), (64, 128, 4),
                                             (32, 64, 2), (64, 256, 8)):
            for split_k in (1, 2, 4, 8):
                yield GemvConfig(block_n, block_kb, split_k, use_dot, num_warps)


def run_nf4_matmul(out: Path, sweep: bool) -> list[dict]:
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF

    from tuneforge.kernels.nf4_gemv import default_config, nf4_matmul

    bandwidth = copy_bandwidth()
    rows_out = []
    for n, k in NF4_SHAPES:
        dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        packed, state = BF.quantize_4bit(dense, quant_type="nf4", compress_statistics=True)
        del dense
        weight_bytes = n * k // 2
        for rows in NF4_ROWS:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                want = x @ BF.dequantize_4bit(packed, state).t()
                got = nf4_matmul(x, packed, state)
                fns = {
                    "ours": lambda: nf4_matmul(x, packed, state),
                    "bnb_dequant_matmul": lambda: x @ BF.dequantize_4bit(packed, state).t(),
                    "bnb_matmul_4bit": lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state),
                }
                row = {"n": n, "k": k, "rows": rows, "config": str(default_config(rows, n, k, x.dtype, x.device)),
                       "max_rel_err_vs_bnb": round(((got.float() - want.float()).abs().max()
                                                    / want.float().abs().max()).item(), 5)}
                for label, fn in fns.items():
                    ms = do_bench(fn)
                    row[f"{label}_ms"] = round(ms, 4)
                    row[f"{label}_gbps"] = round(weight_bytes / (ms * 1e-3) / 1e9)
                if sweep:
                    timed = []
                    for config in _nf4_sweep_configs(rows):
                        timed.append((do_bench(lambda config=config: nf4_matmul(x, packed, state, config=config)), config))
                    best_ms, best = min(timed, key=lambda t: t[0])
                    row.update(best_ms=round(best_ms, 4), best_gbps=round(weight_bytes / (best_ms * 1e-3) / 1e9),
                               best_config=str(best))
            row["ours_frac_of_copy"] = round(row["ours_gbps"] / bandwidth, 3)
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    save_results(
        out, "nf4_matmul", rows_out,
        "| N x K | rows | ours ms | GB/s | bnb dequant+matmul ms | bnb matmul_4bit ms | ours vs matmul_4bit |"
        + (" best sweep ms | best config |" if sweep else ""),
        [f"| {r['n']} x {r['k']} | {r['rows']} | {r['ours_ms']} | {r['ours_gbps']} | {r['bnb_dequant_matmul_ms']} | "
         f"{r['bnb_matmul_4bit_ms']} | {r['bnb_matmul_4bit_ms'] / r['ours_ms']:.2f}x |"
         + (f" {r['best_ms']} | {r['best_config']} |" if sweep else "") for r in rows_out],
        f"GB/s of the packed weight; copy bandwidth {bandwidth:.0f} GB/s on {torch.cuda.get_device_name()}")
    return rows_out


# --- RMSNorm forward launch sweep --------------------------------------------------------------------

RMS_HIDDEN = (576, 2048, 3584, 4096, 8192)


def run_rms_norm_sweep(out: Path) -> list[dict]:
    """Forward ms and fraction of copy bandwidth per (rows per program, warps), per hidden size."""
    import os

    import triton

    from tuneforge import switches
    from tuneforge.kernels import rms_norm

    bandwidth = copy_bandwidth()
    rows_out = []
    for hidden in RMS_HIDDEN:
        x = torch.randn(TOKENS, hidden, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
        moved = 2 * nbytes(x) + nbytes(w)
        block = triton.next_power_of_2(hidden)
        want = rms_norm.reference_rms_norm(x, w, 1e-5)
        compiled = torch.compile(rms_norm.reference_rms_norm)
        row = {"hidden": hidden, "compiled_ms": round(do_bench(lambda: compiled(x, w, 1e-5)), 4),
               "default_config": "%d,%d" % rms_norm._forward_launch(hidden, hidden)[1:]}
        timed = {}
        for rows in (1, 2, 4, 8, 16):
            for warps in (2, 4, 8, 16):
                if rows * block > 32768 or rows * block < 32 * warps:  # spills, or idle threads
                    continue
                os.environ[rms_norm.FWD_LAUNCH_ENV] = f"{rows},{warps}"
                switches.resolve()  # the kernel reads the launch from the resolved switches
                error = (rms_norm.rms_norm(x, w, 1e-5).float() - want.float()).abs().max().item()
                assert error <= 0.02 * want.float().abs().max().item(), (hidden, rows, warps, error)
                timed[f"{rows},{warps}"] = do_bench(lambda: rms_norm.rms_norm(x, w, 1e-5))
        os.environ.pop(rms_norm.FWD_LAUNCH_ENV)
        switches.resolve()
        row["default_ms"] = round(do_bench(lambda: rms_norm.rms_norm(x, w, 1e-5)), 4)
        best = min(timed, key=timed.get)
        row.update(best_config=best, best_ms=round(timed[best], 4),
                   best_frac_of_copy=round(moved / (timed[best] * 1e-3) / 1e9 / bandwidth, 3),
                   default_frac_of_copy=round(moved / (row["default_ms"] * 1e-3) / 1e9 / bandwidth, 3),
                   compiled_frac_of_copy=round(moved / (row["compiled_ms"] * 1e-3) / 1e9 / bandwidth, 3),
                   sweep_ms={k: round(v, 4) for k, v in timed.items()})
        rows_out.append(row)
        print(json.dumps(row), flush=True)
    save_results(
        out, "rms_norm_sweep", rows_out,
        "| hidden | default (rows,warps) | ms | of copy BW | best (rows,warps) | ms | of copy BW | torch.compile ms | of copy BW |",
        [f"| {r['hidden']} | {r['default_config']} | {r['default_ms']} | {r['default_frac_of_copy']} | "
         f"{r['best_config']} | {r['best_ms']} | {r['best_frac_of_copy']} | {r['compiled_ms']} | "
         f"{r['compiled_frac_of_copy']} |" for r in rows_out],
        f"{TOKENS} rows, bf16; copy bandwidth {bandwidth:.0f} GB/s on {torch.cuda.get_device_name()}")
    return rows_out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--only", choices=["nf4_matmul", "rms_norm"], help="run one section only")
    parser.add_argument("--sweep", action="store_true", help="nf4_matmul: also time a grid of launch configs")
    args = parser.parse_args()
    if args.only == "rms_norm":
        run_rms_norm_sweep(Path(args.out))
    else:
        if args.only is None:
            run(Path(args.out))
        run_nf4_matmul(Path(args.out), args.sweep)
