"""DDP and FSDP2 on 2 CPU processes (gloo) train exactly like one process on the same global batch.

The reference is one process with batch 4; the distributed runs are 2 ranks x batch 2, launched
by torchrun (this file is also the worker script). Data order is the same by construction:
sequential sampling, and accelerate hands rank r the r-th half of each global batch of 4.

Plain SGD on purpose: Adam's update does not depend on the gradient's scale, so it would hide
a gradient summed instead of averaged over ranks; with SGD every error shows, linearly.
Gradient clipping is on and binds (max_grad_norm below every measured norm), so FSDP's norm
over sharded gradients must be the global one, and the grad norms are compared too.

Tolerances, float32 (on the CPU the trainer keeps even QLoRA adapters fp32):
  loss, grad norm   rtol 1e-5: the same sums, split in two and added by an all-reduce (float32
                    reassociation: ~1e-7)
  adapter weights   atol 1e-6, 1e-4 of the largest weight (> 1e-2 after three steps): a wrong
                    batch, scale or shard fails by orders of magnitude.
bf16 (the GPU set-up: FSDP2's mixed-precision policy vs autocast in one process): see TOLERANCES.

Beyond equal numbers, each run counts the memory-saving paths it takes (`watch_fast_paths`):
on one GPU QLoRA needs 11 GiB at 32k tokens where FSDP2 once took 51 GiB per GPU because its
loss silently fell back to full logits. Sharded runs must take the same paths, call for call.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from tuneforge.train import distributed
from tuneforge.train.distributed import DistributedConfigError

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]
STEPS, GLOBAL_BATCH, RANKS = 3, 4, 2
LEARNING_RATE, MAX_GRAD_NORM = 1.0, 0.5
LOSS_RTOL, NORM_RTOL, ADAPTER_ATOL = 1e-5, 1e-5, 1e-6  # see the module docstring
# bf16: one process under autocast vs FSDP2's bf16 all-gathers: 3.7e-5 / 5.8e-4 / 8e-4 measured
# (adapter weights up to 0.096), allowed ~5x. A loss rounded to bf16 (12.5625 for 12.5788) is 1e-3 off.
TOLERANCES = {"float32": (LOSS_RTOL, NORM_RTOL, ADAPTER_ATOL), "bfloat16": (2e-4, 3e-3, 4e-3)}


# ---------------------------------------------------------------- the worker (run by torchrun)

CE_CHUNK_ROWS = 4  # the chunked loss's rows per chunk here (a batch holds 2 x 4..10 tokens and more)


@contextlib.contextmanager
def watch_fast_paths(vocab: int, element_size: int):
    """Count, in this process, the memory-saving paths a training run takes; yields the counts.

      chunked_loss            calls of the chunked loss's autograd Function (one per forward)
      lm_head_forward         calls of lm_head's own forward (full logits: must stay 0)
      max_logit_rows          the most rows of any new [..., vocab] tensor any op made: the loss's
                              chunk (CE_CHUNK_ROWS, forced small) unless full logits existed
      offloaded_layer_inputs  tensors the offloaded checkpointing packed (one per layer per forward)
      lora_mlp / lora_qkv / lora_linear   calls of the fused LoRA ops (forward and recompute)
      bnb_matmul_4bit         bitsandbytes' own 4-bit matmul (peft's path: 0 when all is fused)
    """
    from collections import Counter

    import bitsandbytes as bnb
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    import tuneforge.kernels.cross_entropy as cross_entropy
    import tuneforge.kernels.lora as lora
    from tuneforge.patch.activation_checkpointing import LayerInputOffloader

    counts = Counter(max_logit_rows=0)

    def counted(name, function):
        def call(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)
        return call

    class LogitRows(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.is_view:  # holds nothing new (lm_head.weight.t() is [hidden, vocab])
                return out
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == vocab:
                    counts["max_logit_rows"] = max(counts["max_logit_rows"], t.numel() // vocab)
            return out

    originals = [(cross_entropy, "LinearCrossEntropyFunction"), (cross_entropy, "_CHUNK_BYTES_CPU"),
                 (LayerInputOffloader, "pack"), (bnb, "matmul_4bit"),
                 *((lora, name) for name in ("lora_mlp", "lora_qkv", "lora_linear"))]
    saved = [(owner, name, getattr(owner, name)) for owner, name in originals]
    loss_function = cross_entropy.LinearCrossEntropyFunction
    cross_entropy.LinearCrossEntropyFunction = types.SimpleNamespace(
        apply=counted("chunked_loss", loss_function.apply))
    cross_entropy._CHUNK_BYTES_CPU = CE_CHUNK_ROWS * vocab * element_size
    LayerInputOffloader.pack = counted("offloaded_layer_inputs", LayerInputOffloader.pack)
    bnb.matmul_4bit = counted("bnb_matmul_4bit", bnb.matmul_4bit)
    for name in ("lora_mlp", "lora_qkv", "lora_linear"):
        setattr(lora, name, counted(name, getattr(lora, name)))
    try:
        with LogitRows():
            yield counts
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def synthetic_rows(count: int = 32, seed: int = 0) -> list[dict]:
    """Token rows of uneven length (4..10), so per-rank padding differs from the single batch's."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        length = int(torch.randint(4, 11, (1,), generator=generator))
        rows.append({"input_ids": torch.randint(20, 317, (length,), generator=generator).tolist()})
    return rows


def run_worker(spec: dict) -> dict:
    """Train the tiny model as `spec` says; rank 0 writes result.json and the adapter to spec['out']."""
    from datasets import Dataset

    from tuneforge import FastLanguageModel
    from tuneforge.train.trainer import SFTConfig, SFTTrainer

    strategy = spec["strategy"]
    bf16 = spec.get("dtype", "float32") == "bfloat16"
    model, tokenizer = FastLanguageModel.from_pretrained(
        spec["model_dir"], max_seq_length=64, dtype=spec.get("dtype", "float32"), load_in_4bit=spec["load_in_4bit"],
        use_kernels=spec["kernels"] in ("all", "model"),
        fsdp=strategy == "fsdp",  # the NF4 storage dtype depends on it
    )
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=1,
                                             use_gradient_checkpointing=spec["checkpointing"],
                                             use_kernels=spec["kernels"] == "all")
    extra = distributed.fsdp_arguments(model) if strategy == "fsdp" else {}
    args = SFTConfig(
        output_dir=spec["out"], max_steps=STEPS, per_device_train_batch_size=spec["batch"],
        learning_rate=LEARNING_RATE, optim="sgd", lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=MAX_GRAD_NORM, logging_steps=1, save_strategy="no", train_sampling_strategy="sequential",
        seed=0, max_length=64, dataloader_num_workers=0, disable_tqdm=True,
        # bf16 on the CPU: what GPUs run (FSDP2's mixed-precision policy); one process asks for the CPU itself
        bf16=bf16, use_cpu=bf16 and not torch.cuda.is_available(), **extra,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(synthetic_rows()),
                         processing_class=tokenizer)
    distributed.check_strategy(trainer, None if strategy == "single" else strategy)
    lm_head = model.get_base_model().lm_head
    with watch_fast_paths(lm_head.out_features, torch.finfo(lm_head.weight.dtype).bits // 8) as paths:
        hook = lm_head.register_forward_hook(lambda *_: paths.update(["lm_head_forward"]))
        trainer.train()
        hook.remove()
    trainer.save_model(str(Path(spec["out"]) / "adapter"))

    wrapped = trainer.model_wrapped
    parameters = dict(wrapped.named_parameters())
    lora = next(p for n, p in parameters.items() if "lora_A" in n)
    base = next(p for n, p in parameters.items() if n.endswith("q_proj.base_layer.weight"))
    local = lambda p: tuple(getattr(p, "_local_tensor", p).shape)  # noqa: E731
    result = {
        "world_size": trainer.args.world_size,
        "wrapper": type(wrapped).__name__,
        "fsdp": bool(trainer.is_fsdp_enabled),
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "grad_norms": [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e],
        "lora_shape": [list(lora.shape), list(local(lora))],
        "base_shape": [list(base.shape), list(local(base))],
        "base_dtype": str(getattr(base, "_local_tensor", base).dtype),
        "base_is_4bit": hasattr(getattr(model.get_base_model().model.layers[0].self_attn.q_proj, "base_layer"),
                                "quant_state"),
        "kernels": list(model.get_base_model().tuneforge.kernels) + list(model.get_base_model().tuneforge.lora_kernels),
        "paths": dict(paths),
        "outside_forward": _read_base_weight(model.get_base_model().model.layers[0].mlp.down_proj),
    }
    if trainer.args.process_index == 0:
        (Path(spec["out"]) / "result.json").write_text(json.dumps(result))
    return result


def _read_base_weight(layer) -> str:
    """What the fused kernels' weight reader says of `layer` between steps: 'ok', or its error."""
    from tuneforge.integration.weights import base_weight_parts

    try:
        base_weight_parts(layer)
    except ValueError as error:
        return str(error)
    return "ok"


# ---------------------------------------------------------------- helpers of the tests


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir, smollm2_dir):
    from transformers import AutoTokenizer

    if not (tiny_llama_dir / "tokenizer.json").exists():
        AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(tiny_llama_dir)
    return str(tiny_llama_dir)


def launch(spec: dict, nproc: int) -> dict:
    """Run the worker in `nproc` processes through torchrun; rank 0's result."""
    Path(spec["out"]).mkdir(parents=True, exist_ok=True)
    command = distributed.torchrun_command(nproc, [str(HERE), json.dumps(spec)], port=distributed.free_port())
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    if done.returncode != 0:
        raise AssertionError(f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return json.loads((Path(spec["out"]) / "result.json").read_text())


def read_adapter(out: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "adapter" / "adapter_model.safetensors"))


def assert_same_training(result: dict, reference: dict, out: str, reference_out: str,
                         dtype: str = "float32") -> None:
    assert result["world_size"] == RANKS and reference["world_size"] == 1
    assert len(result["losses"]) == STEPS
    adapter, expected = read_adapter(out), read_adapter(reference_out)
    assert adapter.keys() == expected.keys() and len(expected) == 28  # 7 projections x 2 layers x A, B
    assert {t.dtype for t in expected.values()} | {t.dtype for t in adapter.values()} == {torch.float32}
    loss_rtol, norm_rtol, adapter_atol = TOLERANCES[dtype]
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference["losses"]),
                               rtol=loss_rtol, atol=0)
    torch.testing.assert_close(torch.tensor(result["grad_norms"]), torch.tensor(reference["grad_norms"]),
                               rtol=norm_rtol, atol=0)
    assert min(reference["grad_norms"]) > MAX_GRAD_NORM, "clipping must bind for the test to cover it"
    moved = max(t.abs().max().item() for name, t in expected.items() if "lora_B" in name)
    assert moved > 1e-2, "B starts at zero: the adapter must have moved for the comparison to mean anything"
    for name, tensor in expected.items():
        torch.testing.assert_close(adapter[name], tensor, rtol=0, atol=adapter_atol, msg=name)


# ---------------------------------------------------------------- distributed runs


@pytest.fixture(scope="module")
def single_runs(model_dir, tmp_path_factory):
    """The 1-process reference (batch 4), computed once per configuration, in this process."""
    cache = {}

    def get(load_in_4bit: bool, kernels: str, dtype: str):
        key = (load_in_4bit, kernels, dtype)
        if key not in cache:
            out = str(tmp_path_factory.mktemp("single"))
            spec = dict(strategy="single", model_dir=model_dir, out=out, batch=GLOBAL_BATCH,
                        load_in_4bit=load_in_4bit, checkpointing="unsloth", kernels=kernels, dtype=dtype)
            cache[key] = (run_worker(spec), out)
        return cache[key]

    return get


@pytest.mark.parametrize(
    "strategy, load_in_4bit, kernels, dtype",
    [
        ("ddp", False, "all", "float32"),
        ("fsdp", False, "all", "float32"),
        # QLoRA: the NF4 base sharded by FSDP2, with every kernel (the fused LoRA ops read the
        # quant_state bitsandbytes keeps on the module: FSDP2 all-gathers the weight as a plain tensor).
        ("fsdp", True, "all", "float32"),
        # What GPUs run: bf16 compute, FSDP2's mixed-precision policy (bf16 all-gathers, fp32
        # gradient reduction, the NF4 bytes stored as bf16) against one process under autocast.
        ("fsdp", True, "all", "bfloat16"),
    ],
)
def test_two_ranks_train_like_one(strategy, load_in_4bit, kernels, dtype, model_dir, single_runs, tmp_path):
    """Offloaded gradient checkpointing ("unsloth") on throughout."""
    reference, reference_out = single_runs(load_in_4bit, kernels, dtype)
    out = str(tmp_path / strategy)
    spec = dict(strategy=strategy, model_dir=model_dir, out=out, batch=GLOBAL_BATCH // RANKS,
                load_in_4bit=load_in_4bit, checkpointing="unsloth", kernels=kernels, dtype=dtype)
    result = launch(spec, RANKS)

    if strategy == "ddp":
        assert result["wrapper"] == "DistributedDataParallel" and not result["fsdp"]
    else:
        # FSDP2: every parameter is a DTensor holding half of dim 0 on this rank.
        assert result["fsdp"] and result["wrapper"].startswith("FSDP")
        (full, local) = result["lora_shape"]
        assert local[0] * RANKS == full[0] and local[1:] == full[1:]
        (full, local) = result["base_shape"]
        assert local[0] * RANKS == full[0], "the (4-bit) base weight must be sharded too"
        if load_in_4bit:
            assert result["base_is_4bit"] and result["base_dtype"] == f"torch.{dtype}"
        # Between steps a base weight is a shard: the kernels' reader says so instead of misreading it.
        assert "FSDP2 shard" in result["outside_forward"], result["outside_forward"]
    assert result["kernels"] == reference["kernels"]
    # The patch layer is live: norms, RoPE, MLP, loss (and the fused LoRA ops where asked).
    assert {"rms_norm", "rope", "swiglu", "fused_cross_entropy"} <= set(result["kernels"]), result["kernels"]
    assert ("lora_mlp" in result["kernels"]) == (kernels == "all"), result["kernels"]
    # ... and every memory-saving path runs as on one process, call for call: the loss in chunks
    # (no op ever made more than a chunk of [tokens, vocab] logits, lm_head's forward never ran),
    # each layer's input offloaded once per forward, every LoRA projection through a fused op.
    layers = 2
    expected = {"chunked_loss": STEPS, "max_logit_rows": CE_CHUNK_ROWS, "offloaded_layer_inputs": layers * STEPS,
                # forward and checkpointed recompute; lora_linear: o_proj
                "lora_mlp": 2 * layers * STEPS, "lora_qkv": 2 * layers * STEPS, "lora_linear": 2 * layers * STEPS}
    assert result["paths"] == reference["paths"] == expected, (result["paths"], reference["paths"])
    assert_same_training(result, reference, out, reference_out, dtype)


@pytest.mark.parametrize("strategy", [
    "ddp",
    "fsdp",
])
def test_cli_nproc_2_trains_like_one_process(strategy, tmp_path):
    """`tuneforge train cfg --nproc 2 [--fsdp]`, the user's command (relaunch under torchrun, chat
    rows through the template, the trainer's callbacks, the adapter written by rank 0), equals
    `tuneforge train` in one process on the same global batch. Random sampling, as users run it:
    every rank draws the same seeded permutation and accelerate hands each its half of a batch."""
    import yaml
    from tiny_chat_model import save_tiny_chat_model

    from tuneforge.train.callbacks import read_log
    from tuneforge.data.sources import default_rows
    from tuneforge.train.command import train
    from tuneforge.config import config_from_dict

    model_dir = save_tiny_chat_model(tmp_path / "model")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in default_rows("train")[:16]))

    def config(batch: int, output: Path) -> dict:
        return {
            "model": {"name": str(model_dir), "load_in_4bit": False, "max_seq_length": 128, "use_kernels": False},
            "lora": {"r": 4, "lora_alpha": 8, "use_gradient_checkpointing": "unsloth"},
            "data": {"path": str(data)},
            "training": {"output_dir": str(output), "max_steps": STEPS, "per_device_train_batch_size": batch,
                         "learning_rate": LEARNING_RATE, "warmup_steps": 0, "lr_scheduler_type": "constant",
                         "optim": "sgd", "max_grad_norm": MAX_GRAD_NORM, "report_to": "none"},
        }

    single = tmp_path / "single"
    train(config_from_dict(config(GLOBAL_BATCH, single)))
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(config(GLOBAL_BATCH // RANKS, tmp_path / "two")))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    command = [sys.executable, "-m", "tuneforge.cli", "train", str(path), "--nproc", str(RANKS)]
    done = subprocess.run(command + (["--fsdp"] if strategy == "fsdp" else []),
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-6000:]

    two, one = read_log(tmp_path / "two"), read_log(single)
    assert [row["step"] for row in two] == [row["step"] for row in one] == list(range(1, STEPS + 1))
    for key, rtol in (("loss", LOSS_RTOL), ("grad_norm", NORM_RTOL)):
        torch.testing.assert_close(torch.tensor([r[key] for r in two]), torch.tensor([r[key] for r in one]),
                                   rtol=rtol, atol=0, msg=key)
    adapter, expected = read_adapter(str(tmp_path / "two")), read_adapter(str(single))
    assert adapter.keys() == expected.keys()
    for name, tensor in expected.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(adapter[name], tensor, rtol=0, atol=ADAPTER_ATOL, msg=name)
    assert (tmp_path / "two" / "adapter" / "tokenizer_config.json").is_file()
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["steps"] == STEPS


def test_cli_refuses_fsdp_without_processes(tmp_path):
    from tuneforge.cli import main

    assert main(["train", "--fsdp", "--output", str(tmp_path)]) == 2
    assert main(["train", "--nproc", "0", "--output", str(tmp_path)]) == 2


# ---------------------------------------------------------------- the pieces, one by one


@pytest.mark.parametrize("env, expected", [
    ({}, (1, 0, 0, False)),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, (2, 1, 1, True)),
    ({"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1"}, (8, 5, 1, True)),
])
def test_rank_and_world_come_from_the_launcher(monkeypatch, env, expected):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    got = (distributed.world_size(), distributed.rank(), distributed.local_rank(), distributed.is_distributed())
    assert got == expected
    assert distributed.is_main_process() == (expected[1] == 0)


def test_bad_launcher_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(DistributedConfigError, match="WORLD_SIZE='two'"):
        distributed.world_size()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU placement")
def test_without_cuda_every_rank_loads_on_the_cpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.device_map() == "cpu"


@pytest.mark.parametrize("fsdp, compute, expected", [
    (False, torch.bfloat16, torch.uint8),
    (True, torch.bfloat16, torch.bfloat16),
    (True, torch.float16, torch.float16),
    (True, torch.float32, torch.float32),
])
def test_nf4_storage_is_floating_only_under_fsdp(fsdp, compute, expected):
    from tuneforge.models.loader import quant_storage_dtype, quantization_config

    assert quant_storage_dtype(compute, fsdp) == expected
    assert quantization_config(True, False, compute, fsdp=fsdp).bnb_4bit_quant_storage == expected


@pytest.mark.parametrize("given", ["argument", "environment"])
def test_nf4_storage_dtype_does_not_change_the_model(model_dir, monkeypatch, given):
    """The same packed bytes, typed uint8 or float32: identical logits. FSDP is asked for by the
    `fsdp` argument (`tuneforge train --strategy fsdp`), which wins over the environment, or by
    `accelerate launch --use_fsdp`'s ACCELERATE_USE_FSDP."""
    from tuneforge import FastLanguageModel

    ids = torch.randint(20, 317, (2, 12), generator=torch.Generator().manual_seed(3))
    logits = {}
    for fsdp in (False, True):
        told = {"fsdp": fsdp} if given == "argument" else {}
        monkeypatch.setenv(distributed.FSDP_ENV, str(fsdp != (given == "argument")).lower())
        model, _ = FastLanguageModel.from_pretrained(model_dir, load_in_4bit=True, dtype="float32", use_kernels=False,
                                                     **told)
        weight = model.model.layers[0].mlp.down_proj.weight
        assert type(weight).__name__ == "Params4bit"
        assert weight.dtype == (torch.float32 if fsdp else torch.uint8)
        assert model.tuneforge.switches.fsdp == fsdp
        with torch.no_grad():
            logits[fsdp] = model(input_ids=ids).logits
    torch.testing.assert_close(logits[True], logits[False], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "phi3"])
def test_fsdp_wraps_each_decoder_layer_class(family):
    """The class FSDP shards one by one is the model's decoder layer (peft wrapper or not)."""
    import peft

    from tuneforge.testing import tiny_model

    model = tiny_model(family)
    expected = [type(model.model.layers[0]).__name__]
    assert distributed.decoder_layer_classes(model) == expected
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["o_proj"]))
    arguments = distributed.fsdp_arguments(wrapped)
    assert arguments["fsdp_config"]["transformer_layer_cls_to_wrap"] == expected


def test_a_model_without_decoder_layers_is_refused():
    with pytest.raises(DistributedConfigError, match="no decoder layer class"):
        distributed.decoder_layer_classes(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_fsdp_arguments_reach_accelerate_with_our_policy(tmp_path):
    """SFTConfig turns our fsdp arguments into accelerate's FSDP2 plugin settings."""
    from tuneforge.testing import tiny_model
    from tuneforge.train.trainer import SFTConfig

    args = SFTConfig(output_dir=str(tmp_path), **distributed.fsdp_arguments(tiny_model("llama")))
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2
    assert plugin["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"
    assert plugin["reshard_after_forward"] is True and plugin["state_dict_type"] == "FULL_STATE_DICT"
    # fp32 on the CPU: nothing to cast, accelerate's default (no policy) is right.
    assert "mixed_precision_policy" not in plugin

    class Bf16Args:  # what finish_arguments reads of a bf16 run's TrainingArguments
        bf16, fp16, optim = True, False, "adamw_torch"
        fsdp_plugin_args = {"fsdp_version": 2}

    distributed.finish_arguments(Bf16Args)
    policy = Bf16Args.fsdp_plugin_args["mixed_precision_policy"]
    assert (policy.param_dtype, policy.reduce_dtype, policy.output_dtype) == (torch.bfloat16, torch.float32, None)


@pytest.mark.parametrize("optim, expected", [
    ("adamw_8bit", "adamw_torch"), ("paged_adamw_8bit", "adamw_torch"), ("adamw_bnb_8bit", "adamw_torch"),
    ("adamw_torch", "adamw_torch"), ("sgd", "sgd"),
])
def test_fsdp_replaces_bitsandbytes_optimizers(optim, expected, tmp_path, caplog):
    """bitsandbytes' kernels cannot step DTensor shards ("optimizer_update_32bit does not have a
    sharding strategy registered"), and the CLI's default optim is adamw_8bit."""
    from tuneforge.testing import tiny_model
    from tuneforge.train.trainer import SFTConfig

    args = SFTConfig(output_dir=str(tmp_path), optim=optim, **distributed.fsdp_arguments(tiny_model("llama")))
    assert str(getattr(args.optim, "value", args.optim)) == expected
    assert ("cannot step sharded parameters" in caplog.text) == (optim != expected)
    plain = SFTConfig(output_dir=str(tmp_path), optim=optim)
    assert str(getattr(plain.optim, "value", plain.optim)) == optim


def test_mixed_precision_policy_reduces_in_fp32_and_leaves_outputs_alone():
    """fp32 gradient reduction; no output cast, which would round the fp32 loss to bf16."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    assert distributed.mixed_precision_policy(torch.float32) is None
    for compute in (torch.bfloat16, torch.float16):
        policy = distributed.mixed_precision_policy(compute)
        assert (policy.param_dtype, policy.reduce_dtype, policy.output_dtype) == (compute, torch.float32, None)
        # accelerate takes it as the plugin's policy, and its own mixed-precision setting keeps it
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, mixed_precision_policy=policy)
        plugin.set_mixed_precision("bf16")
        assert plugin.mixed_precision_policy is policy


@pytest.mark.parametrize("argv, expected", [
    (["train", "c.yaml", "--nproc", "2", "--fsdp"], ["train", "c.yaml", "--fsdp"]),
    (["-v", "train", "--nproc=4", "c.yaml"], ["-v", "train", "c.yaml"]),
    (["train", "--npr", "2", "--output", "o"], ["train", "--output", "o"]),
    (["train", "c.yaml", "--max-steps", "3"], ["train", "c.yaml", "--max-steps", "3"]),
])
def test_relaunched_processes_do_not_see_nproc(argv, expected):
    assert distributed.without_option(argv, "--nproc") == expected


@pytest.mark.parametrize("nproc", [0, -1])
def test_nproc_below_one_is_refused(nproc):
    with pytest.raises(DistributedConfigError, match="--nproc must be >= 1"):
        distributed.torchrun_command(nproc, ["train"])


def test_torchrun_command_runs_the_cli_in_n_processes():
    command = distributed.torchrun_command(2, ["-m", "tuneforge.cli", "train", "cfg.yaml"], port=29999)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=2" in command and "--master-port=29999" in command
    assert command[-4:] == ["-m", "tuneforge.cli", "train", "cfg.yaml"]
    assert "--standalone" in distributed.torchrun_command(1, ["x.py"])


if __name__ == "__main__":
    run_worker(json.loads(sys.argv[1]))
    distributed.shutdown()


@pytest.mark.parametrize("given, expected", [(None, False), (True, True)])
def test_ddp_skips_the_unused_parameter_search_unless_asked(given, expected, tmp_path):
    """transformers would ask DDP to search for unused parameters on every step for a peft model
    (not a PreTrainedModel); every LoRA weight is used, so SFTConfig turns that off, and the
    broadcast of RoPE's identical buffers too. A user's explicit setting is kept."""
    from tuneforge.train.trainer import SFTConfig

    args = SFTConfig(output_dir=str(tmp_path), ddp_find_unused_parameters=given)
    assert args.ddp_find_unused_parameters is expected
    assert args.ddp_broadcast_buffers is False
