"""Count the kernels one training step issues, on the CPU (no GPU needed): the proxy for a step
that is bound by the CPU launching kernels (bench/cpu_profile.py measured ~60 µs of CPU per kernel
on the H100 host).

A tiny Llama saved to a temp folder goes through FastLanguageModel with NF4 and LoRA on the seven
projections, offloaded checkpointing and the kernels on (Triton under its CPU interpreter); one
forward + backward is counted twice: with grouped projections (the default) and
with `TUNEFORGE_LORA_GROUPS=0`'s per-projection path. Counted: Triton launches, and ATen compute
ops (views, reshapes and other metadata-only ops excluded: they launch nothing).

  TRITON_INTERPRET=1 python bench/launch_count.py
"""

from __future__ import annotations

import collections
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# ATen ops that only make a new view or read metadata (no kernel on a GPU).
NO_KERNEL = {
    "view", "_unsafe_view", "t", "transpose", "permute", "slice", "select", "as_strided", "expand", "detach",
    "alias", "unsqueeze", "squeeze", "split", "split_with_sizes", "unbind", "reshape", "narrow", "_reshape_alias",
    "lift_fresh", "empty_like", "empty", "empty_strided", "is_same_size", "_to_copy_noop", "set_", "resolve_conj",
    "resolve_neg", "numpy_T", "_local_scalar_dense", "is_nonzero", "sym_size", "sym_stride", "sym_numel",
}


class OpCounter(TorchDispatchMode):
    """Counts ATen compute ops, except those the Triton interpreter runs to emulate a kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.inside_triton = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NO_KERNEL and not self.inside_triton:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def count_step(model, optimizer, ids) -> tuple[int, int, collections.Counter]:
    """(Triton launches, ATen compute ops, ops by name) of one forward + backward; the optimizer
    step runs outside the count (it does not depend on how the projections run)."""
    from triton.runtime import interpreter

    launches = [0]
    original = interpreter.GridExecutor.__call__
    ops = OpCounter()

    def counting(self, *args, **kwargs):
        launches[0] += 1
        ops.inside_triton = True
        try:
            return original(self, *args, **kwargs)
        finally:
            ops.inside_triton = False

    interpreter.GridExecutor.__call__ = counting
    try:
        with ops:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
    finally:
        interpreter.GridExecutor.__call__ = original
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return launches[0], sum(ops.counts.values()), ops.counts


def main() -> None:
    from tuneforge import FastLanguageModel
    from tuneforge.testing import tiny_model
    from tuneforge.train.optim import build_optimizer

    seven = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ids = torch.randint(3, 317, (2, 32), generator=torch.Generator().manual_seed(0))
    rows = []
    for grouped in (False, True):
        # The grouping is chosen when the LoRA layers are patched, from the switches the loader resolves.
        os.environ["TUNEFORGE_LORA_GROUPS"] = "1" if grouped else "0"
        with tempfile.TemporaryDirectory() as folder:
            tiny_model("llama", num_hidden_layers=4).save_pretrained(folder)
            model, _ = FastLanguageModel.from_pretrained(folder, max_seq_length=64, load_in_4bit=True,
                                                         dtype=torch.float32, use_kernels=True)
        model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, target_modules=seven,
                                                 use_gradient_checkpointing="unsloth", random_state=3)
        model.train()
        optimizer = build_optimizer(model, optim="adamw_torch", learning_rate=1e-4)
        layers = model.config.num_hidden_layers
        count_step(model, optimizer, ids)  # warm-up: caches, lazy state
        triton_launches, aten_ops, by_name = count_step(model, optimizer, ids)
        rows.append((grouped, triton_launches, aten_ops))
        if "--ops" in sys.argv:
            print("grouped" if grouped else "one by one", dict(by_name.most_common()))
    print(f"tiny Llama, {layers} layers, NF4 + LoRA on 7 projections, offloaded checkpointing, forward + backward:")
    print("| projections | Triton launches | ATen compute ops | all | per layer |")
    print("|---|---|---|---|---|")
    for grouped, triton_launches, aten_ops in rows:
        total = triton_launches + aten_ops
        print(f"| {'grouped' if grouped else 'one by one'} | {triton_launches} | {aten_ops} | {total} | "
              f"{total / layers:.1f} |")


if __name__ == "__main__":
    main()
