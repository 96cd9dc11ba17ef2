"""The graphed training step (train/graphed_step.py) against the eager step it replaces.

Reference: the same model, optimizer and batches stepped eagerly (forward under autocast,
backward, 8-bit AdamW step). Over three steps with optimizer updates between them, the graphed
step's losses and every LoRA gradient must match: a replay that read stale LoRA casts, lost a
gradient, or missed an offloaded input would differ from the second step on. The GPU cases run
through the device tool; the refusals are checked here on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from tuneforge.train.graphed_step import GraphedStep, GraphUnsupported, unsupported_reason

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _batches(vocab: int, count: int, batch: int = 2, seq: int = 64, same: bool = False):
    out = []
    for i in range(count):
        generator = torch.Generator().manual_seed(0 if same else i)
        ids = torch.randint(0, vocab, (batch, seq), generator=generator)
        labels = ids.clone()
        labels[:, : seq // 4] = -100  # a prompt that is not trained on
        out.append({"input_ids": ids.cuda(), "labels": labels.cuda()})
    return out


def _trained(folder, checkpointing, four_bit: bool, graphed: bool, same: bool = False, accumulate: bool = False):
    from tuneforge import FastLanguageModel
    from tuneforge.train.optim import build_optimizer

    model, _ = FastLanguageModel.from_pretrained(str(folder), max_seq_length=64, load_in_4bit=four_bit,
                                                 dtype=torch.bfloat16)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, lora_dropout=0, target_modules=SEVEN,
                                             use_gradient_checkpointing=checkpointing, random_state=0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, optim="adamw_8bit", learning_rate=1e-2)
    batches = _batches(model.config.vocab_size, 4 if accumulate else 3, same=same)
    step = GraphedStep(model, batches[0]) if graphed else None
    losses, grads = [], []
    pairs = [(batches[0], False), (batches[1], True), (batches[2], False), (batches[3], True)] if accumulate \
        else [(b, False) for b in batches]
    for index, (batch, add) in enumerate(pairs):
        if step is not None:
            loss = step.step(batch, accumulate=add)
        else:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(**batch).loss
            loss.backward()
        losses.append(float(loss))
        if accumulate and index % 2 == 0:
            continue
        grads.append([p.grad.detach().float().clone() for p in params])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, grads


def _close(graphed, eager):
    losses_g, grads_g = graphed
    losses_e, grads_e = eager
    assert losses_g == pytest.approx(losses_e, rel=1e-4), (losses_g, losses_e)
    for step, (gs, es) in enumerate(zip(grads_g, grads_e)):
        for g, e in zip(gs, es):
            scale = e.abs().max().clamp_min(1e-6)
            assert ((g - e).abs().max() / scale) < 2e-2, f"step {step}: gradient differs"
    # The updates must reach the replays: with the same batch every step, the loss moves.
    return losses_g


@pytest.mark.gpu
@pytest.mark.parametrize("checkpointing", ["unsloth", True, False])
@pytest.mark.parametrize("four_bit", [True, False], ids=["nf4", "bf16"])
def test_graphed_step_matches_eager(tiny_llama_dir, checkpointing, four_bit):
    eager = _trained(tiny_llama_dir, checkpointing, four_bit, graphed=False)
    graphed = _trained(tiny_llama_dir, checkpointing, four_bit, graphed=True)
    _close(graphed, eager)


@pytest.mark.gpu
def test_graphed_step_sees_optimizer_updates(tiny_llama_dir):
    eager = _trained(tiny_llama_dir, "unsloth", True, graphed=False, same=True)
    graphed = _trained(tiny_llama_dir, "unsloth", True, graphed=True, same=True)
    losses = _close(graphed, eager)
    assert losses[2] < losses[0] - 1e-3  # same batch, lr 1e-2: the replays trained


@pytest.mark.gpu
def test_graphed_step_accumulates(tiny_llama_dir):
    eager = _trained(tiny_llama_dir, "unsloth", True, graphed=False, accumulate=True)
    graphed = _trained(tiny_llama_dir, "unsloth", True, graphed=True, accumulate=True)
    _close(graphed, eager)


def test_refusals_name_the_reason(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    model.train()
    ids = torch.zeros(1, 8, dtype=torch.long)
    batch = {"input_ids": ids, "labels": ids}
    assert "not on a CUDA device" in unsupported_reason(model, batch)
    with pytest.raises(GraphUnsupported, match="not on a CUDA device"):
        GraphedStep(model, batch)
    assert "no labels" in unsupported_reason(model, {"input_ids": ids})
    assert "packed" in unsupported_reason(model, dict(batch, position_ids=ids))
    model.model.layers[0].mlp.add_module("drop", torch.nn.Dropout(0.1))
    assert "dropout p=0.1 in model.layers.0.mlp.drop" in unsupported_reason(model, batch)
    model.eval()  # dropout off: back to the device verdict
    assert "not on a CUDA device" in unsupported_reason(model, batch)
    for p in model.parameters():
        p.requires_grad_(False)
    assert "no trainable parameters" in unsupported_reason(model, batch)
