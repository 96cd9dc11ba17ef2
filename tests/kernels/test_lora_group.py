"""Grouped projections (kernels/lora_group.py): Q|K|V and gate|up of NF4 bases as one GEMM.

`group_forward` / `group_backward` are first held to `reference_group_forward` /
`reference_group_backward` (plain PyTorch, one projection at a time) on dense and NF4 bases: fp32
to float rounding of differently ordered sums (rtol 1e-5, atol 1e-5 of the output scale), bf16 to
2% in relative norm (the group rounds X A^T and the concatenated adapters to bf16 once; the
reference rounds each product separately).

The fused ops take this path whenever every base in the group is NF4; each case below is checked
against peft's own layers (tolerances in lora_checks): adapters of different ranks and scales
(folded into the block-diagonal B), a projection without adapter, biases, a total rank above one
kernel tile (block-wise updates), bf16, and the per-step cache of the concatenated adapters.
"""

import bitsandbytes.functional as BF
import pytest
import torch

from tuneforge.kernels.lora_group import (
    Projection,
    ProjectionGroup,
    group_backward,
    group_forward,
    groupable,
    reference_group_backward,
    reference_group_forward,
)
from tuneforge.lora.projections import lora_mlp, lora_qkv, projection_of
from tuneforge.testing import tiny_model

from kernel_checks import rel_err, use_switches
from lora_checks import DEVICE, HIDDEN_ACT, Attention, assert_close, lora_params, outputs_and_grads, peft_wrap, to_4bit

QKV = ["q_proj", "k_proj", "v_proj"]
CASES = {
    "same-r8": dict(r=8),
    "scale-one": dict(r=8, alpha_pattern={name: 8 for name in QKV}),  # alpha = r: no scaling launches
    "ranks-and-alphas-differ": dict(r=8, rank_pattern={"k_proj": 4, "v_proj": 12}, alpha_pattern={"v_proj": 5}),
    "rslora-r32-above-one-tile": dict(r=32, rslora=True),  # total rank 96 > 64: one update per block
}


def _projections(base, dtype, ranks, scales, biases, seed=0):
    """Projections of 72 inputs to 48, 24, 24 outputs: rank 0 means no adapter; a bias requires grad."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE)

    parts = []
    for n, r, s, bias in zip((48, 24, 24), ranks, scales, biases):
        dense = randn(n, 72) / 8
        if base == "nf4":
            weight, state = BF.quantize_4bit(dense, blocksize=64, quant_type="nf4", compress_statistics=True)
        else:
            weight, state = dense.to(dtype), None
        b = randn(n).to(dtype).requires_grad_() if bias else None
        lora_a = randn(r, 72).to(dtype) / 4 if r else None
        lora_b = randn(n, r).to(dtype) / 4 if r else None
        parts.append(Projection(weight, state, b, lora_a, lora_b, s))
    return parts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("base", ["dense", "nf4"])
@pytest.mark.parametrize("ranks,scales,biases", [
    ((8, 8, 8), (2.0, 2.0, 2.0), (False, False, False)),  # one scale: it goes to the kernels
    ((8, 0, 12), (2.0, 1.0, 0.5), (True, False, True)),  # K without adapter, scales folded into Bd
    ((32, 32, 16), (0.25, 0.25, 0.25), (False, True, False)),  # total rank 80 > one tile: block-wise updates
], ids=["same-scale", "no-k-adapter-folded-bias", "above-one-tile"])
def test_group_matches_the_per_projection_reference(base, dtype, ranks, scales, biases):
    parts = _projections(base, dtype, ranks, scales, biases)
    group = ProjectionGroup(parts)
    assert groupable(parts) == (base == "nf4")  # dense bases compute as a group but are never grouped
    g = torch.Generator().manual_seed(5)
    x2 = torch.randn(13, 72, generator=g).to(DEVICE, dtype)
    dy = torch.randn(13, group.out_features, generator=g).to(DEVICE, dtype)
    y, xa = group_forward(x2, group)
    dx, grads = group_backward(dy, x2, xa, group, need_dx=True)
    want_dx, want_grads = reference_group_backward(dy, x2, parts)
    got = [y, dx] + [t for triple in grads for t in triple if t is not None]
    want = [reference_group_forward(x2, parts), want_dx] + [t for triple in want_grads for t in triple if t is not None]
    assert [t is None for triple in grads for t in triple] == [t is None for triple in want_grads for t in triple]
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
        else:
            assert rel_err(a, b) < 2e-2


def _group(*layers) -> ProjectionGroup:
    parts = [projection_of(layer).as_args() for layer in layers]
    assert groupable(parts)
    return ProjectionGroup(parts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_qkv_group_matches_peft(case, bias, dtype):
    config = dict(CASES[case])
    attn = peft_wrap(Attention("nf4", bias=bias), QKV, config.pop("r"), dtype, **config)
    layers = (attn.q_proj, attn.k_proj, attn.v_proj)
    group = _group(*layers)
    assert group.folded == (case == "ranks-and-alphas-differ")
    x = torch.randn(2, 7, 72, device=DEVICE, dtype=dtype)
    params = lora_params(*layers)
    got = outputs_and_grads(lambda t: lora_qkv(t, *layers), x, params)
    want = outputs_and_grads(lambda t: tuple(layer(t) for layer in layers), x, params)
    assert_close(got[0] + got[1], want[0] + want[1], dtype)


def test_qkv_group_outputs_are_column_blocks_of_one_gemm():
    attn = peft_wrap(Attention("nf4", bias=False), ["q_proj", "v_proj"], 8)  # K without adapter
    q, k, v = lora_qkv(torch.randn(3, 72, device=DEVICE, requires_grad=True), attn.q_proj, attn.k_proj, attn.v_proj)
    assert q._base is not None and q._base is k._base is v._base
    assert q._base.shape == (3, 96) and [t.shape[-1] for t in (q, k, v)] == [48, 24, 24]


@pytest.mark.parametrize(
    "activation,dtype,ranks",
    [
        ("silu", torch.float32, {}),
        ("gelu_tanh", torch.float32, {"up_proj": 4}),
        ("gelu", torch.float32, {}),
        ("silu", torch.bfloat16, {"gate_proj": 16}),
        ("gelu_tanh", torch.bfloat16, {}),
    ],
)
def test_mlp_group_matches_peft(activation, dtype, ranks):
    """gate|up as one GEMM, the activation reading both halves of its output in place, and the
    backward kernel turning that buffer into d[gate | up]."""
    model = tiny_model("llama", hidden_act=HIDDEN_ACT[activation])
    mlp = model.model.layers[0].mlp
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(mlp, name, to_4bit(getattr(mlp, name)))
    peft_model = peft_wrap(model, ["gate_proj", "up_proj", "down_proj"], 8, dtype, rank_pattern=ranks)
    mlp = peft_model.model.layers[0].mlp
    layers = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    _group(mlp.gate_proj, mlp.up_proj)
    x = torch.randn(2, 9, 64, device=DEVICE, dtype=dtype)
    params = lora_params(*layers)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        got = outputs_and_grads(lambda t: lora_mlp(t, *layers, activation=activation), x, params)
    assert (18, 2 * 176) in saved  # [g | u] kept as one buffer
    want = outputs_and_grads(mlp, x, params)
    assert_close(got[0] + got[1], want[0] + want[1], dtype)


def test_concatenated_adapters_follow_optimizer_steps_and_in_place_writes():
    """A and the block-diagonal B are cached per optimizer step: after a step, or an in-place
    write into an adapter, the group computes with the new values."""
    attn = peft_wrap(Attention("nf4", bias=False), QKV, 8)
    layers = (attn.q_proj, attn.k_proj, attn.v_proj)
    params = lora_params(*layers)
    optimizer = torch.optim.SGD(params, lr=0.5)
    x = torch.randn(4, 72, device=DEVICE)
    for change in ("first call", "optimizer step", "in-place write"):
        if change == "optimizer step":
            sum(y.square().sum() for y in lora_qkv(x, *layers)).backward()
            optimizer.step()
        elif change == "in-place write":
            with torch.no_grad():
                attn.k_proj.lora_B.default.weight.mul_(-3.0)
        with torch.no_grad():
            got = lora_qkv(x, *layers)
            want = tuple(layer(x) for layer in layers)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=change)


def test_dense_bases_are_not_grouped():
    attn = peft_wrap(Attention("dense", bias=False), QKV, 8)
    parts = [projection_of(layer).as_args() for layer in (attn.q_proj, attn.k_proj, attn.v_proj)]
    assert not groupable(parts) and not groupable(parts[:1])


def test_a_kernel_that_does_not_build_turns_grouping_off_with_a_warning(monkeypatch, caplog):
    """On a GPU the grouped kernels are built once per configuration before use; one that fails
    to build (here: simulated) leaves the per-projection path, with a warning, and the same result."""
    import logging

    import triton.runtime.errors

    import tuneforge.kernels.lora as lora

    monkeypatch.setitem(lora._builds, "failed", False)
    monkeypatch.setitem(lora._builds, "built", set())
    monkeypatch.setattr(lora, "_checks_builds", lambda x: True)
    built = []

    def fails(group, x, activation):
        built.append(activation)
        raise triton.runtime.errors.OutOfResources(300_000, 232_448, "shared memory")

    monkeypatch.setattr(lora, "_build_group_kernels", fails)
    attn = peft_wrap(Attention("nf4", bias=False), QKV, 8)
    layers = (attn.q_proj, attn.k_proj, attn.v_proj)
    x = torch.randn(5, 72, device=DEVICE)
    with caplog.at_level(logging.WARNING, logger="tuneforge.kernels.lora"):
        got = outputs_and_grads(lambda t: lora_qkv(t, *layers, grouped=True), x, lora_params(*layers))
    assert built == [None] and lora._builds["failed"] is True
    assert "grouped LoRA projections off" in caplog.text and "OutOfResources" in caplog.text
    assert got[0][0]._base is None  # per-projection outputs, not column views
    want = outputs_and_grads(lambda t: tuple(layer(t) for layer in layers), x, lora_params(*layers))
    assert_close(got[0] + got[1], want[0] + want[1], torch.float32)


def test_grouping_can_be_switched_off(monkeypatch):
    """By the argument, and by default from the switches (TUNEFORGE_LORA_GROUPS=0)."""
    attn = peft_wrap(Attention("nf4", bias=False), QKV, 8)
    layers = (attn.q_proj, attn.k_proj, attn.v_proj)
    x = torch.randn(3, 72, device=DEVICE)
    assert lora_qkv(x, *layers, grouped=False)[0]._base is None
    assert lora_qkv(x, *layers, grouped=True)[0]._base is not None
    monkeypatch.setenv("TUNEFORGE_LORA_GROUPS", "0")
    use_switches(monkeypatch)
    assert lora_qkv(x, *layers)[0]._base is None


@pytest.mark.parametrize("r", [8, 32], ids=["one-tile", "block-wise"])
def test_kernel_build_check_runs_every_grouped_kernel_once(r):
    """What the GPU build check runs (here under the interpreter): it must work at the real widths."""
    import tuneforge.kernels.lora as lora

    model = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    for name in ("gate_proj", "up_proj"):
        setattr(mlp, name, to_4bit(getattr(mlp, name)))
    mlp = peft_wrap(model, ["gate_proj", "up_proj"], r).model.layers[0].mlp
    group = _group(mlp.gate_proj, mlp.up_proj)
    for dtype in (torch.float32, torch.bfloat16):
        lora._build_group_kernels(group, torch.zeros(1, 64, dtype=dtype, device=DEVICE), "silu")


def test_groups_under_autocast_match_peft():
    """The GPU training set-up: fp32 adapters, bf16 autocast. The groups build their concatenated
    adapters in bf16 and return fp32 gradients; results agree with peft to bf16 rounding."""
    model = tiny_model("llama")
    layer = model.model.layers[0]
    for module, names in ((layer.self_attn, QKV), (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
        for name in names:
            setattr(module, name, to_4bit(getattr(module, name)))
    layer = peft_wrap(model, QKV + ["gate_proj", "up_proj", "down_proj"], 8).model.layers[0]
    qkv = (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
    mlp = (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
    params = lora_params(*qkv, *mlp)
    x = torch.randn(2, 9, 64, device=DEVICE)

    def block(q_k_v, gated):
        def run(t):
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                return (*q_k_v(t), gated(t))
        return run

    got = outputs_and_grads(block(lambda t: lora_qkv(t, *qkv), lambda t: lora_mlp(t, *mlp)), x, params)
    want = outputs_and_grads(block(lambda t: tuple(p(t) for p in qkv), layer.mlp), x, params)
    assert all(y.dtype == torch.bfloat16 for y in got[0]) and all(g.dtype == torch.float32 for g in got[1])
    # bitsandbytes' CPU Linear4bit (fp32 compute dtype) is not autocast: peft's outputs stay fp32.
    assert_close(got[0] + got[1], [y.bfloat16() for y in want[0]] + want[1], torch.bfloat16)
