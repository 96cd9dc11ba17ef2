"""The optimiser: parameter groups, torch AdamW equivalence, 8-bit AdamW vs fp32, the fallbacks, the
Trainer hook."""

import dataclasses
import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tuneforge.testing import tiny_model
from tuneforge.train import optim as optim_module
from tuneforge.train.optim import OPTIMIZERS, build_optimizer, create_optimizer_for_trainer, parameter_groups

LR, EMBEDDING_LR, WEIGHT_DECAY = 1e-3, 1e-4, 0.01


def cpt_model():
    """Tiny Llama + LoRA, embed_tokens and lm_head trained in full (continued pre-training), and the
    final norm trained too so that a 1-D parameter exists."""
    model = get_peft_model(
        tiny_model("llama"),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"]),
    )
    model.get_base_model().model.norm.weight.requires_grad_(True)
    return model


def trainable(model):
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def random_grads(model, generator):
    for param in trainable(model).values():
        param.grad = torch.randn(param.shape, generator=generator)


def relative_difference(change, expected):
    return ((change - expected).norm() / expected.norm()).item()


def run_steps(model, optimizer, steps):
    """Apply `steps` steps of the same random gradients; return each parameter's total change."""
    start = {name: param.detach().clone() for name, param in trainable(model).items()}
    generator = torch.Generator().manual_seed(3)
    for _ in range(steps):
        random_grads(model, generator)
        optimizer.step()
    return {name: param.detach() - start[name] for name, param in trainable(model).items()}


def test_parameter_groups_for_continued_pretraining():
    model = cpt_model()
    groups = {g["name"]: g for g in parameter_groups(
        model, learning_rate=LR, embedding_learning_rate=EMBEDDING_LR, weight_decay=WEIGHT_DECAY
    )}
    names = {id(p): n for n, p in model.named_parameters()}
    in_group = {key: sorted(names[id(p)] for p in g["params"]) for key, g in groups.items()}

    assert set(groups) == {"lora", "no_decay", "embeddings"}
    assert in_group["lora"] and all("lora_A" in n or "lora_B" in n for n in in_group["lora"])
    assert in_group["no_decay"] == ["base_model.model.model.norm.weight"]
    assert in_group["embeddings"] == [
        "base_model.model.lm_head.modules_to_save.default.weight",
        "base_model.model.model.embed_tokens.modules_to_save.default.weight",
    ]
    # Every trainable parameter is in exactly one group; nothing frozen is.
    assert sorted(n for group in in_group.values() for n in group) == sorted(trainable(model))
    assert (groups["lora"]["lr"], groups["lora"]["weight_decay"]) == (LR, WEIGHT_DECAY)
    assert (groups["no_decay"]["lr"], groups["no_decay"]["weight_decay"]) == (LR, 0.0)
    assert (groups["embeddings"]["lr"], groups["embeddings"]["weight_decay"]) == (EMBEDDING_LR, WEIGHT_DECAY)


def test_embeddings_default_to_the_main_learning_rate():
    groups = parameter_groups(cpt_model(), learning_rate=LR, weight_decay=WEIGHT_DECAY)
    assert {g["name"]: g["lr"] for g in groups} == {"lora": LR, "no_decay": LR, "embeddings": LR}


def test_embedding_learning_rate_without_trained_embeddings_is_reported(caplog):
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    with caplog.at_level(logging.WARNING, logger="tuneforge.train.optim"):
        groups = parameter_groups(model, learning_rate=LR, embedding_learning_rate=EMBEDDING_LR)
    assert [g["name"] for g in groups] == ["lora"]
    assert "embedding_learning_rate=0.0001 has no effect" in caplog.text


def test_no_trainable_parameters_is_an_error():
    model = tiny_model("llama").requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, optim="adamw_torch", learning_rate=LR)


def test_unknown_optimizer_names_the_choices():
    with pytest.raises(ValueError, match="adamw_8bit"):
        build_optimizer(cpt_model(), optim="adamw_9bit", learning_rate=LR)


def test_adamw_torch_step_equals_hand_built_adamw(caplog):
    ours, reference = cpt_model(), cpt_model()
    betas, eps = (0.8, 0.95), 1e-6
    with caplog.at_level(logging.INFO, logger="tuneforge.train.optim"):
        optimizer = build_optimizer(
            ours, optim="adamw_torch", learning_rate=LR, embedding_learning_rate=EMBEDDING_LR,
            weight_decay=WEIGHT_DECAY, betas=betas, eps=eps,
        )
    assert "embeddings 40,576 params (lr 0.0001, weight decay 0.01)" in caplog.text  # 2 x 317 x 64

    params = trainable(reference)
    by_hand = torch.optim.AdamW(
        [
            {"params": [p for n, p in params.items() if "lora_" in n], "lr": LR, "weight_decay": WEIGHT_DECAY},
            {"params": [params["base_model.model.model.norm.weight"]], "lr": LR, "weight_decay": 0.0},
            {"params": [p for n, p in params.items() if "modules_to_save" in n], "lr": EMBEDDING_LR,
             "weight_decay": WEIGHT_DECAY},
        ],
        betas=betas, eps=eps,
    )
    ours_change = run_steps(ours, optimizer, steps=1)
    reference_change = run_steps(reference, by_hand, steps=1)
    for name, change in reference_change.items():
        assert change.abs().max() > 0, name
        torch.testing.assert_close(ours_change[name], change, rtol=1e-6, atol=0, msg=name)


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "paged_adamw_32bit"])
def test_other_32bit_optimizers_equal_adamw_torch(optim):
    """Same algorithm, other kernels: the parameters' changes agree to fp32 rounding of the parameters
    (the changes are 1e-4 of parameters that are 1e-1, so 1e-4 relative is a few ulps)."""
    reference = run_steps(model := cpt_model(), build_optimizer(
        model, optim="adamw_torch", learning_rate=LR, embedding_learning_rate=EMBEDDING_LR, weight_decay=WEIGHT_DECAY
    ), steps=3)
    model = cpt_model()
    change = run_steps(model, build_optimizer(
        model, optim=optim, learning_rate=LR, embedding_learning_rate=EMBEDDING_LR, weight_decay=WEIGHT_DECAY
    ), steps=3)
    for name, expected in reference.items():
        assert relative_difference(change[name], expected) < 1e-4, name


@pytest.mark.parametrize("optim", ["adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit"])
def test_8bit_adamw_tracks_fp32_adamw(optim, caplog):
    """bitsandbytes' 8-bit AdamW runs on this CPU: after 5 steps each parameter moved like fp32 AdamW
    (relative difference < 5%, about 1% measured), and the large tensors really kept 8-bit state."""
    model = cpt_model()
    reference = run_steps(model, build_optimizer(
        model, optim="adamw_torch", learning_rate=LR, embedding_learning_rate=EMBEDDING_LR, weight_decay=WEIGHT_DECAY
    ), steps=5)
    model = cpt_model()
    with caplog.at_level(logging.INFO, logger="tuneforge.train.optim"):
        optimizer = build_optimizer(
            model, optim=optim, learning_rate=LR, embedding_learning_rate=EMBEDDING_LR, weight_decay=WEIGHT_DECAY
        )
    change = run_steps(model, optimizer, steps=5)

    assert "(bitsandbytes AdamW8bit)" in caplog.text and "falling back" not in caplog.text
    if optim.startswith("paged"):
        assert "paging needs a CUDA device" in caplog.text
    for name, expected in reference.items():
        assert relative_difference(change[name], expected) < 0.05, name
    lm_head = "base_model.model.lm_head.modules_to_save.default.weight"
    assert optimizer.state[trainable(model)[lm_head]]["state1"].dtype == torch.uint8
    # Quantised moments move the parameters measurably differently from fp32 (32-bit kernels: < 1e-4).
    assert relative_difference(change[lm_head], reference[lm_head]) > 1e-3


def test_8bit_falls_back_to_torch_adamw_with_a_warning(monkeypatch, caplog):
    class Broken8bit(torch.optim.AdamW):  # stands in for bitsandbytes without kernels for the device
        def step(self, closure=None):
            raise RuntimeError("no kernel for this device")

    import bitsandbytes.optim

    monkeypatch.setattr(bitsandbytes.optim, "AdamW8bit", Broken8bit)
    monkeypatch.setattr(optim_module, "_PROBED", {})
    with caplog.at_level(logging.WARNING, logger="tuneforge.train.optim"):
        optimizer = build_optimizer(cpt_model(), optim="adamw_8bit", learning_rate=LR)
    assert type(optimizer) is torch.optim.AdamW
    assert "bitsandbytes AdamW8bit does not run on cpu (RuntimeError: no kernel for this device)" in caplog.text
    assert "falling back to torch.optim.AdamW" in caplog.text


def test_every_table_entry_builds():
    # Guards the table against names that no longer exist in bitsandbytes / torch.
    for optim in OPTIMIZERS:
        assert isinstance(build_optimizer(cpt_model(), optim=optim, learning_rate=LR), torch.optim.Optimizer)


@dataclasses.dataclass
class ArgumentsWithEmbeddingLR:
    """The TrainingArguments fields the hook reads (TrainingArguments itself is built in the next test)."""

    optim: str = "adamw_torch"
    learning_rate: float = LR
    weight_decay: float = WEIGHT_DECAY
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    optim_args: str | None = None
    embedding_learning_rate: float | None = EMBEDDING_LR


def test_trainer_subclass_builds_our_optimizer(tmp_path):
    from transformers import Trainer, TrainingArguments

    @dataclasses.dataclass
    class Arguments(TrainingArguments):
        embedding_learning_rate: float | None = None

    class OurTrainer(Trainer):
        def create_optimizer(self, *args, **kwargs):
            if self.optimizer is None:
                self.optimizer = create_optimizer_for_trainer(self)
            return super().create_optimizer(*args, **kwargs)

    args = Arguments(
        output_dir=str(tmp_path), optim="adamw_torch", learning_rate=LR, weight_decay=WEIGHT_DECAY,
        embedding_learning_rate=EMBEDDING_LR, adam_beta2=0.95, report_to=[], use_cpu=True,
    )
    trainer = OurTrainer(model=cpt_model(), args=args)
    optimizer = trainer.create_optimizer()
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == {"lora": LR, "no_decay": LR, "embeddings": EMBEDDING_LR}
    assert all(g["betas"] == (0.9, 0.95) for g in optimizer.param_groups)


def test_trainer_hook_leaves_other_optimizers_to_transformers(caplog):
    trainer = type("Trainer", (), {"args": ArgumentsWithEmbeddingLR(optim="adafactor", embedding_learning_rate=None)})
    with caplog.at_level(logging.INFO, logger="tuneforge.train.optim"):
        assert create_optimizer_for_trainer(trainer, model=cpt_model()) is None
    assert "adafactor: built by transformers' Trainer" in caplog.text


@pytest.mark.parametrize(
    "fields, message",
    [({"optim": "adafactor"}, "embedding_learning_rate needs one of"), ({"optim_args": "foo=1"}, "optim_args")],
)
def test_trainer_hook_rejects_what_it_would_ignore(fields, message):
    trainer = type("Trainer", (), {"args": ArgumentsWithEmbeddingLR(**fields)})
    with pytest.raises(ValueError, match=message):
        create_optimizer_for_trainer(trainer, model=cpt_model())
