"""The optimiser: parameter groups, torch AdamW equivalence, 8-bit AdamW vs fp32, the fallbacks, the
Trainer hook; FlatAdamW8bit against bitsandbytes' AdamW8bit, bit for bit."""

import dataclasses
import logging

import bitsandbytes
import pytest
import torch
from peft import LoraConfig, get_peft_model

from tuneforge.testing import tiny_model
from tuneforge.train import optim as optim_module
from tuneforge.train.optim import (
    OPTIMIZERS,
    FlatAdamW8bit,
    build_optimizer,
    create_optimizer_for_trainer,
    parameter_groups,
)

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

    assert "(bitsandbytes AdamW8bit" in caplog.text and "falling back" not in caplog.text
    if optim.startswith("paged"):
        assert "paging needs a CUDA device" in caplog.text
        assert type(optimizer) is bitsandbytes.optim.AdamW8bit
    else:
        assert type(optimizer) is FlatAdamW8bit
    for name, expected in reference.items():
        assert relative_difference(change[name], expected) < 0.05, name
    lm_head = "base_model.model.lm_head.modules_to_save.default.weight"
    state = optimizer.parameter_state if isinstance(optimizer, FlatAdamW8bit) else optimizer.state.get
    assert state(trainable(model)[lm_head])["state1"].dtype == torch.uint8
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
    fp16: bool = False


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


# --- FlatAdamW8bit: bitsandbytes' AdamW8bit stepped over flat buffers ---------------------------

# Sizes that are not whole 256-element blocks (the segments get padded) and sizes under
# bitsandbytes' min_8bit_size of 4096 (32-bit state: stepped alone, as AdamW8bit does).
GROUP_SHAPES = [
    [(16, 300), (40, 130), (7,), (4, 1100), (4100,)],  # lr 1e-2, weight decay 0.1
    [(8, 512), (3, 3), (4097,), (64, 70)],  # lr 3e-3, no weight decay
]
FLAT_LOG = "7 tensors (31,173 elements) in 2 flat buffer(s); 2 stepped one by one (2 with 32-bit state"


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]  # CUDA: bitsandbytes' own kernels


def make_params(dtype=torch.float32, seed=1, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.nn.Parameter(torch.randn(shape, generator=generator).to(device, dtype)) for shape in shapes]
            for shapes in GROUP_SHAPES]


def groups_of(params):
    return [{"params": params[0], "lr": 1e-2, "weight_decay": 0.1}, {"params": params[1], "lr": 3e-3, "weight_decay": 0.0}]


def flat(params):
    return [p for group in params for p in group]


def clone_params(params):
    return [[torch.nn.Parameter(p.detach().clone()) for p in group] for group in params]


def to_cpu(params):
    return [p.detach().cpu() for p in flat(params)]


def step_together(pairs, steps, seed=2):
    """`steps` steps of each (optimizer, params) in `pairs` with the same random gradients; after each
    step every group's learning rate halves, as a scheduler would change it."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=generator).to(p.device, p.dtype) for p in flat(pairs[0][1])]
        for optimizer, params in pairs:
            for p, grad in zip(flat(params), grads):
                p.grad = grad.clone()
            optimizer.step()
            for group in optimizer.param_groups:
                group["lr"] *= 0.5


def state_of(optimizer, p):
    return optimizer.parameter_state(p) if isinstance(optimizer, FlatAdamW8bit) else optimizer.state[p]


def assert_same_state(optimizer, params, reference, reference_params):
    for p, q in zip(flat(params), flat(reference_params)):
        ours, theirs = state_of(optimizer, p), state_of(reference, q)
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            assert torch.equal(ours[key], value) if torch.is_tensor(value) else ours[key] == value, (p.shape, key)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flat_adamw8bit_equals_adamw8bit_bit_for_bit(dtype, device, caplog):
    ours, theirs = make_params(dtype, device=device), make_params(dtype, device=device)
    with caplog.at_level(logging.INFO, logger="tuneforge.train.optim"):
        flat_optimizer = FlatAdamW8bit(groups_of(ours), lr=LR)
    reference = bitsandbytes.optim.AdamW8bit(groups_of(theirs), lr=LR)
    assert FLAT_LOG in caplog.text
    assert [len(g["params"]) for g in flat_optimizer.param_groups] == [2, 2]  # a buffer + one small tensor each

    start = [p.detach().clone() for p in flat(ours)]
    step_together([(flat_optimizer, ours), (reference, theirs)], steps=5)
    for p, q, before in zip(flat(ours), flat(theirs), start):
        assert not torch.equal(p, before)
        assert torch.equal(p, q), p.shape
    assert_same_state(flat_optimizer, ours, reference, theirs)
    assert flat_optimizer.parameter_state(ours[0][0])["state1"].dtype == torch.uint8


def test_parameters_are_block_aligned_views_into_their_buffer():
    params = make_params()
    optimizer = FlatAdamW8bit(groups_of(params), lr=LR)
    step_together([(optimizer, params)], steps=3)
    for group, members in zip(optimizer.param_groups, params):
        buffer, end = group["params"][0].detach(), 0
        for p in members:
            offset = (p.data_ptr() - buffer.data_ptr()) // p.element_size()
            if p.numel() < 4096:  # 32-bit state: stepped alone, not in the buffer
                assert not 0 <= offset < buffer.numel()
                continue
            assert offset == end  # in order, each starting a quantisation block
            assert torch.equal(buffer[offset : offset + p.numel()], p.detach().reshape(-1))
            end = offset + -(-p.numel() // 256) * 256
        assert end == buffer.numel()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("saver, loader", [("flat", "flat"), ("adamw8bit", "flat"), ("flat", "adamw8bit")])
def test_state_dict_round_trip_continues_like_an_unbroken_run(saver, loader, device, tmp_path):
    """Save after 3 steps, load into a new optimizer over copies of the parameters, step on: the
    same as 6 steps in one go. The saved state is AdamW8bit's, so checkpoints cross between them."""
    build = {"flat": FlatAdamW8bit, "adamw8bit": bitsandbytes.optim.AdamW8bit}
    unbroken_params = make_params(device=device)
    unbroken = build[saver](groups_of(unbroken_params), lr=LR)
    step_together([(unbroken, unbroken_params)], steps=3)
    torch.save(unbroken.state_dict(), tmp_path / "optimizer.pt")

    resumed_params = clone_params(unbroken_params)
    resumed = build[loader](groups_of(resumed_params), lr=LR)
    # Loaded as the Trainer loads it: onto the CPU, tensors only.
    resumed.load_state_dict(torch.load(tmp_path / "optimizer.pt", map_location="cpu", weights_only=True))
    assert [g["lr"] for g in resumed.param_groups] == [g["lr"] for g in unbroken.param_groups]  # as scheduled
    step_together([(unbroken, unbroken_params), (resumed, resumed_params)], steps=3, seed=5)
    for p, q in zip(flat(resumed_params), flat(unbroken_params)):
        assert torch.equal(p, q), p.shape
    assert_same_state(resumed, resumed_params, unbroken, unbroken_params)


def test_loading_state_of_other_parameters_is_refused():
    params = make_params()
    optimizer = FlatAdamW8bit(groups_of(params), lr=LR)
    step_together([(optimizer, params)], steps=1)
    saved = optimizer.state_dict()
    fewer = [params[0], params[1][:-1]]
    with pytest.raises(ValueError, match=r"saved for parameter groups of \[5, 4\] tensors; this optimizer has \[5, 3\]"):
        FlatAdamW8bit(groups_of(clone_params(fewer)), lr=LR).load_state_dict(saved)

    # AdamW8bit skips a tensor without a gradient, so its tensors can have taken different numbers
    # of steps; one flat buffer has one step count.
    per_tensor_params = make_params()
    per_tensor = bitsandbytes.optim.AdamW8bit(groups_of(per_tensor_params), lr=LR)
    step_together([(per_tensor, per_tensor_params)], steps=2)
    per_tensor_params[0][0].grad = None
    per_tensor.step()
    with pytest.raises(ValueError, match=r"stepped \[2, 3\] times; resume with TUNEFORGE_FLAT_OPTIMIZER=0"):
        FlatAdamW8bit(groups_of(clone_params(per_tensor_params)), lr=LR).load_state_dict(per_tensor.state_dict())


def test_zero_grad_clears_the_model_parameters_gradients():
    params = make_params()
    optimizer = FlatAdamW8bit(groups_of(params), lr=LR)
    for p in flat(params):
        p.grad = torch.ones_like(p)
    optimizer.zero_grad(set_to_none=False)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in flat(params))
    optimizer.zero_grad()
    assert all(p.grad is None for p in flat(params))


def test_missing_gradients(caplog):
    """A buffer none of whose tensors has a gradient is not stepped, as AdamW8bit skips each of
    them. Some missing: those count as zeros (AdamW8bit would skip them), logged once."""
    ours, theirs = make_params(), make_params()
    flat_optimizer = FlatAdamW8bit(groups_of(ours), lr=LR)
    reference = bitsandbytes.optim.AdamW8bit(groups_of(theirs), lr=LR)
    step_together([(flat_optimizer, ours), (reference, theirs)], steps=2)

    def step_both(grads, reference_grads):
        for p, q, grad, reference_grad in zip(flat(ours), flat(theirs), grads, reference_grads):
            p.grad, q.grad = grad, reference_grad
        flat_optimizer.step()
        reference.step()

    generator = torch.Generator().manual_seed(7)
    before = [p.detach().clone() for p in ours[1]]
    grads = [torch.randn(p.shape, generator=generator) for p in ours[0]] + [None] * len(ours[1])
    step_both(grads, [None if g is None else g.clone() for g in grads])
    assert all(torch.equal(p, b) for p, b in zip(ours[1], before))
    assert flat_optimizer.parameter_state(ours[1][0])["step"] == 2

    grads = [torch.randn(p.shape, generator=generator) for p in flat(ours)]
    grads[0] = None
    with caplog.at_level(logging.WARNING, logger="tuneforge.train.optim"):
        step_both(grads, [torch.zeros_like(theirs[0][0])] + [g.clone() for g in grads[1:]])
    assert "1 of 4 tensors in a flat buffer have no gradient this step" in caplog.text
    for p, q in zip(flat(ours), flat(theirs)):
        assert torch.equal(p, q), p.shape


def test_what_cannot_be_flattened_is_stepped_alone_and_still_equal(monkeypatch, caplog):
    def build():
        generator = torch.Generator().manual_seed(4)
        shared = torch.randn(80, 100, generator=generator)
        return {
            "plain": torch.nn.Parameter(torch.randn(50, 90, generator=generator)),
            "plain too": torch.nn.Parameter(torch.randn(4500, generator=generator)),
            "non-contiguous": torch.nn.Parameter(torch.randn(90, 60, generator=generator).t()),
            "view of a larger tensor": torch.nn.Parameter(shared[:50]),
            "overridden": torch.nn.Parameter(torch.randn(4200, generator=generator)),
            "frozen": torch.nn.Parameter(torch.randn(4300, generator=generator), requires_grad=False),
        }

    ours, theirs = build(), build()
    manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
    # bitsandbytes keeps overrides by id() for good: later tensors could reuse these ids.
    monkeypatch.setattr(manager, "pid2config", {})
    monkeypatch.setattr(manager, "index2config", {})
    for params in (ours, theirs):
        manager.override_config(params["overridden"], "optim_bits", 32)
    with caplog.at_level(logging.INFO, logger="tuneforge.train.optim"):
        flat_optimizer = FlatAdamW8bit(list(ours.values()), lr=LR)
    reference = bitsandbytes.optim.AdamW8bit(list(theirs.values()), lr=LR)
    assert "2 tensors (9,000 elements) in 1 flat buffer(s); 4 stepped one by one (2 sharing storage or " \
           "non-contiguous, 1 with a bitsandbytes config override, 1 frozen)" in caplog.text
    alone = {id(p) for p in flat_optimizer.param_groups[0]["params"]}
    assert all(id(ours[name]) in alone for name in ours if not name.startswith("plain"))

    generator = torch.Generator().manual_seed(6)
    for _ in range(3):
        for name in ours:
            if name != "frozen":
                grad = torch.randn(ours[name].shape, generator=generator)
                ours[name].grad, theirs[name].grad = grad.clone(), grad.clone()
        flat_optimizer.step()
        reference.step()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert flat_optimizer.parameter_state(ours["overridden"])["state1"].dtype == torch.float32


def test_size_caps_keep_tensors_alone(monkeypatch, caplog):
    """Large tensors, and any beyond the flat buffers' total, keep their own update (the step holds
    a gathered copy of the flattened gradients). Caps shrunk to the test's sizes."""
    monkeypatch.setattr(optim_module, "MAX_FLAT_TENSOR", 5000)
    monkeypatch.setattr(optim_module, "MAX_FLAT_TOTAL", 9000)
    ours, theirs = make_params(), make_params()
    with caplog.at_level(logging.INFO, logger="tuneforge.train.optim"):
        flat_optimizer = FlatAdamW8bit(groups_of(ours), lr=LR)
    assert "2 tensors (8,193 elements) in 1 flat buffer(s); 7 stepped one by one (1 large (> 5,000 elements), " \
           "2 with 32-bit state (< 4096 elements), 3 beyond the flat buffers' 9,000 elements, " \
           "1 alone in their group)" in caplog.text
    reference = bitsandbytes.optim.AdamW8bit(groups_of(theirs), lr=LR)
    step_together([(flat_optimizer, ours), (reference, theirs)], steps=3)
    for p, q in zip(flat(ours), flat(theirs)):
        assert torch.equal(p, q), p.shape


def test_a_parameter_whose_storage_was_replaced_is_an_error():
    params = make_params()
    optimizer = FlatAdamW8bit(groups_of(params), lr=LR)
    params[0][1].data = params[0][1].data.clone()  # what model.to(other device or dtype) does
    for p in flat(params):
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match=r"shape \[40, 130\] no longer lives in the optimizer's flat buffer"):
        optimizer.step()


def test_step_hooks_run_once_and_the_fused_lora_weight_cache_sees_the_step():
    """kernels.weight_cache reuses bf16 copies of the LoRA weights until an optimizer step hook
    fires; the flat buffer's in-place update must fire it (once) so the next forward uses the new
    weights."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from tuneforge.kernels.lora import LoRAProjection, lora_linear

    generator = torch.Generator().manual_seed(8)
    weight = torch.randn(64, 64, generator=generator)
    lora_A = torch.nn.Parameter(torch.randn(64, 64, generator=generator) * 0.1)  # [r, in], 4096 elements
    lora_B = torch.nn.Parameter(torch.randn(64, 64, generator=generator) * 0.1)  # [out, r]
    optimizer = FlatAdamW8bit([lora_A, lora_B], lr=0.05)
    assert len(optimizer.param_groups[0]["params"]) == 1  # both in one buffer
    projection = LoRAProjection(weight, lora_A=lora_A, lora_B=lora_B, scaling=0.5)
    x = torch.randn(6, 64, generator=generator).to(torch.bfloat16)

    def forward(p):
        with torch.no_grad():
            return lora_linear(x, p)

    before = forward(projection)  # caches bf16 copies of A and B
    steps = []
    handle = register_optimizer_step_post_hook(lambda *args: steps.append(1))
    try:
        lora_A.grad, lora_B.grad = torch.ones_like(lora_A), torch.ones_like(lora_B)
        optimizer.step()
    finally:
        handle.remove()
    assert len(steps) == 1
    fresh = LoRAProjection(weight, lora_A=lora_A.detach().clone(), lora_B=lora_B.detach().clone(), scaling=0.5)
    after = forward(projection)
    assert not torch.equal(after, before)
    assert torch.equal(after, forward(fresh))


def test_build_optimizer_flattens_8bit_adamw_unless_told_not_to(monkeypatch, caplog):
    def built(**kwargs):
        return build_optimizer(cpt_model(), learning_rate=LR, **kwargs)

    with caplog.at_level(logging.INFO, logger="tuneforge.train.optim"):
        assert type(built(optim="adamw_8bit")) is FlatAdamW8bit
        assert "adamw_8bit (bitsandbytes AdamW8bit over flat buffers)" in caplog.text
        assert type(built(optim="adamw_bnb_8bit")) is FlatAdamW8bit
        assert type(built(optim="adamw_8bit", flat=False)) is bitsandbytes.optim.AdamW8bit
        assert type(built(optim="paged_adamw_8bit")) is bitsandbytes.optim.AdamW8bit
        monkeypatch.setenv("TUNEFORGE_FLAT_OPTIMIZER", "0")
        assert type(built(optim="adamw_8bit")) is bitsandbytes.optim.AdamW8bit
        assert "TUNEFORGE_FLAT_OPTIMIZER=0, bitsandbytes steps each tensor on its own" in caplog.text
    monkeypatch.setenv("TUNEFORGE_FLAT_OPTIMIZER", "maybe")
    with pytest.raises(ValueError, match="TUNEFORGE_FLAT_OPTIMIZER='maybe': write 1"):
        built(optim="adamw_8bit")


def test_flat_and_per_tensor_builds_step_the_same(monkeypatch):
    """Through build_optimizer on a LoRA model with trained embeddings (three groups)."""
    model = cpt_model()
    change = run_steps(model, build_optimizer(model, optim="adamw_8bit", learning_rate=LR, weight_decay=WEIGHT_DECAY,
                                              embedding_learning_rate=EMBEDDING_LR), steps=3)
    model = cpt_model()
    expected = run_steps(model, build_optimizer(model, optim="adamw_8bit", learning_rate=LR, weight_decay=WEIGHT_DECAY,
                                                embedding_learning_rate=EMBEDDING_LR, flat=False), steps=3)
    for name, value in expected.items():
        assert torch.equal(change[name], value), name


def test_fp16_training_steps_each_tensor(caplog):
    """fp16's GradScaler unscales the optimizer's parameters' gradients before step."""
    trainer = type("Trainer", (), {"args": ArgumentsWithEmbeddingLR(optim="adamw_8bit", fp16=True)})
    with caplog.at_level(logging.INFO, logger="tuneforge.train.optim"):
        optimizer = create_optimizer_for_trainer(trainer, model=cpt_model())
    assert type(optimizer) is bitsandbytes.optim.AdamW8bit
    assert "optim=adamw_8bit with fp16" in caplog.text
    trainer.args.fp16 = False
    assert type(create_optimizer_for_trainer(trainer, model=cpt_model())) is FlatAdamW8bit
