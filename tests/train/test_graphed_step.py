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


def _padding_free(vocab: int, count: int, longest: int = 64):
    """Padding-free rows of 2-7 samples each (8-64 tokens per sample): several shapes."""
    from tuneforge.data.packing import PaddingFreeCollator

    generator = torch.Generator().manual_seed(11)
    out = []
    for i in range(count):
        lengths = torch.randint(8, longest + 1, (2 + (5 * i) % 6,), generator=generator).tolist()
        samples = [{"input_ids": torch.randint(0, vocab, (n,), generator=generator).tolist()} for n in lengths]
        out.append(PaddingFreeCollator()(samples))
    return out


def _to_cuda(batch: dict) -> dict:
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}


def _trained(folder, checkpointing, four_bit: bool, graphed: bool, same: bool = False, accumulate: bool = False,
             set_to_none: bool = True, padding_free: bool = False):
    """Losses and LoRA gradients (before each optimizer step) over 3 steps, or 2 steps of 2
    accumulated micro-batches; padding_free: 5 padding-free rows, padded to a budget for the graphs."""
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
    if padding_free:
        from tuneforge.data.packing import pad_to_budget

        rows = _padding_free(model.config.vocab_size, 5)
        batches = [_to_cuda(pad_to_budget(b, longest=64, samples_multiple=4) if graphed else b) for b in rows]
    step = GraphedStep(model) if graphed else None
    losses, grads = [], []
    for index, batch in enumerate(batches):
        if step is not None:
            loss = step.step(batch)
        else:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(**batch).loss
            loss.backward()
        losses.append(float(loss))
        if accumulate and index % 2 == 0:
            continue  # the next micro-batch adds to these gradients
        grads.append([p.grad.detach().float().clone() for p in params])
        optimizer.step()
        optimizer.zero_grad(set_to_none=set_to_none)
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
        GraphedStep(model).step(batch)
    assert "no labels" in unsupported_reason(model, {"input_ids": ids})
    model.model.layers[0].mlp.add_module("drop", torch.nn.Dropout(0.1))
    assert "dropout p=0.1 in model.layers.0.mlp.drop" in unsupported_reason(model, batch)
    model.eval()  # dropout off: back to the device verdict
    assert "not on a CUDA device" in unsupported_reason(model, batch)
    for p in model.parameters():
        p.requires_grad_(False)
    assert "no trainable parameters" in unsupported_reason(model, batch)


@pytest.mark.gpu
def test_graphed_step_with_gradients_zeroed_in_place(tiny_llama_dir):
    eager = _trained(tiny_llama_dir, "unsloth", True, graphed=False, set_to_none=False)
    graphed = _trained(tiny_llama_dir, "unsloth", True, graphed=True, set_to_none=False)
    _close(graphed, eager)


@pytest.mark.gpu
def test_graphed_padding_free_rows_of_several_shapes(tiny_llama_dir):
    """Rows padded to a budget (data.packing.pad_to_budget) replay 2-3 graphs; losses and gradients
    are those of the unpadded rows run eagerly (flash varlen with empty samples at the end)."""
    eager = _trained(tiny_llama_dir, "unsloth", True, graphed=False, padding_free=True)
    graphed = _trained(tiny_llama_dir, "unsloth", True, graphed=True, padding_free=True)
    _close(graphed, eager)


def _sft_run(folder, tmp_path, graphs: bool, monkeypatch):
    """3 optimizer steps of 2 accumulated micro-batches through SFTTrainer (notebook settings)."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from tuneforge import FastLanguageModel, SFTConfig, SFTTrainer

    monkeypatch.setenv("TUNEFORGE_CUDA_GRAPHS", "1" if graphs else "0")
    generator = torch.Generator().manual_seed(5)
    rows = [{"input_ids": torch.randint(3, 300, (int(n),), generator=generator).tolist()}
            for n in torch.randint(8, 64, (24,), generator=generator)]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(317)}, unk_token="t0")),
        pad_token="t0", eos_token="t2")
    model, _ = FastLanguageModel.from_pretrained(str(folder), max_seq_length=64, load_in_4bit=True,
                                                 dtype=torch.bfloat16)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, lora_dropout=0, target_modules=SEVEN,
                                             use_gradient_checkpointing="unsloth", random_state=0)
    args = SFTConfig(output_dir=str(tmp_path / str(graphs)), max_steps=3, per_device_train_batch_size=4,
                     gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1, optim="adamw_8bit",
                     bf16=True, max_length=64, packing=True, report_to="none", seed=1)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    assert trainer._graphs == graphs
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]
    return losses, tokens, {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.gpu
def test_sft_trainer_with_graphs_trains_as_without(tiny_llama_dir, tmp_path, monkeypatch):
    eager_losses, eager_tokens, eager = _sft_run(tiny_llama_dir, tmp_path, False, monkeypatch)
    losses, tokens, adapter = _sft_run(tiny_llama_dir, tmp_path, True, monkeypatch)
    assert losses == pytest.approx(eager_losses, rel=2e-3)
    assert tokens == eager_tokens
    # Adam turns small bf16 differences (padded GEMM shapes) into small update differences: compare
    # each adapter matrix as a whole.
    for name, value in eager.items():
        assert (adapter[name] - value).norm() <= 5e-2 * value.norm().clamp_min(1e-6), name


def test_gradient_views_follow_autograd_rules_on_the_cpu():
    """_Gradients (device-independent bookkeeping of the graphed step): cleared -> zero, kept ->
    accumulate, set elsewhere -> copied in, zeroed in place -> kept; a moved parameter is refused."""
    from tuneforge.train.graphed_step import _Gradients

    a = torch.nn.Parameter(torch.ones(2, 3))
    b = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    c = torch.nn.Parameter(torch.ones(5))
    grads = _Gradients([a, b, c], torch.device("cpu"))
    assert len(grads.buffers) == 2  # one per dtype
    grads.buffers[0].fill_(7)
    grads.prepare()  # all None: start from zero
    assert all(p.grad is g for p, g in zip((a, b, c), grads.views)) and grads.buffers[0].abs().sum() == 0
    grads.views[0].add_(1)  # "a replay" added 1
    grads.prepare()  # kept: nothing changes
    assert torch.equal(a.grad, torch.ones(2, 3))
    a.grad = torch.full((2, 3), 5.0)  # set elsewhere: copied into the view
    b.grad = None  # cleared alone: counts as zero
    c.grad = c.grad.detach().zero_()  # zero_grad(set_to_none=False): same memory, kept
    grads.views[1].fill_(3)
    grads.prepare()
    assert a.grad is grads.views[0] and torch.equal(a.grad, torch.full((2, 3), 5.0))
    assert b.grad is grads.views[1] and b.grad.abs().sum() == 0
    assert c.grad is grads.views[2]
    c.data = torch.ones(5)  # new storage: the graphs would read the old one
    with pytest.raises(GraphUnsupported, match="moved since capture"):
        grads.prepare()


def test_signature_keeps_shapes_and_host_values_apart():
    from tuneforge.train.graphed_step import signature

    base = {"input_ids": torch.zeros(1, 8, dtype=torch.long), "max_length_q": 8, "use_cache": False}
    assert signature(base) == signature({k: (v.clone() if torch.is_tensor(v) else v) for k, v in base.items()})
    assert signature(base) != signature(dict(base, input_ids=torch.zeros(1, 16, dtype=torch.long)))
    assert signature(base) != signature(dict(base, max_length_q=16))
