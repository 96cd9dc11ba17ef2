"""kernels.moe: the experts of a MoE layer (grouped by expert, NF4 or dense, LoRA factored) against
`reference_moe` and against transformers' own experts modules of the three MoE families.

Layouts covered: Qwen3-MoE and Mixtral ([E, 2I, H] gate|up halves, SiLU; Mixtral's routing weights
stay fp32) and gpt-oss ([E, H, 2I] transposed, biases, interleaved gate/up, clamped SwiGLU).

Tolerances (relative error in norm): fp32 1e-5 (the same products summed in another order: per
expert rows here, W + s B A formed first in the reference); bf16 2e-2 (the reference rounds
W + s B A to bf16, the op rounds the LoRA term separately: a few bf16 ulps).
"""

import pytest
import torch

from kernel_checks import rel_err
import tuneforge.kernels.moe as moe_kernel
from tuneforge.kernels.moe import ExpertProjection, moe_experts, reference_moe
from tuneforge.testing.tiny import tiny_config

FAMILIES = ["qwen3_moe", "mixtral", "gpt_oss"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def experts_module(family, implementation="eager", seed=0):
    """transformers' experts module of `family` (tiny config), random weights, fp32."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family)
    config._experts_implementation = implementation
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.1)
    return experts


def routing(tokens, experts, k, generator, fp32_weights=False, dtype=torch.float32, skip=(3,)):
    """(top_k_index [T, K], top_k_weights [T, K]): distinct experts per token; experts in `skip` get none."""
    scores = torch.rand(tokens, experts, generator=generator)
    scores[:, list(skip)] = -1  # an expert without tokens: the op must skip it
    index = scores.topk(k, dim=-1).indices
    weights = torch.rand(tokens, k, generator=generator).softmax(-1)
    return index, weights.to(torch.float32 if fp32_weights else dtype)


def projections(experts, rank=0, generator=None, dtype=torch.float32):
    """(gate_up, down) ExpertProjections of transformers' `experts` (+ random LoRA of `rank`)."""
    out = []
    for name in ("gate_up_proj", "down_proj"):
        weight = getattr(experts, name).detach().to(dtype)
        bias = getattr(experts, f"{name}_bias").detach().to(dtype) if experts.has_bias else None
        e, d1, d2 = weight.shape
        out_f, in_f = (d2, d1) if experts.is_transposed else (d1, d2)
        lora = {}
        if rank:
            lora = dict(lora_A=(0.1 * torch.randn(e, rank, in_f, generator=generator)).requires_grad_(),
                        lora_B=(0.1 * torch.randn(e, out_f, rank, generator=generator)).requires_grad_(),
                        scaling=2.0)
        out.append(ExpertProjection(weight=weight, bias=bias, transposed=experts.is_transposed, **lora))
    return out


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
@pytest.mark.parametrize("family", FAMILIES)
def test_reference_is_transformers_experts(family, implementation):
    experts = experts_module(family, implementation)
    g = torch.Generator().manual_seed(1)
    index, weights = routing(13, experts.num_experts, 2, g, fp32_weights=family == "mixtral")
    hidden = torch.randn(13, 64, generator=g)
    with torch.no_grad():
        want = experts(hidden, index, weights)
        got = reference_moe(hidden, index, weights, *projections(experts), experts._apply_gate)
    assert rel_err(got, want) < 1e-6


@pytest.fixture(params=["grouped", "loop"])
def path(request, monkeypatch):
    """Both ways the op multiplies: torch's grouped_mm (aligned operands) and the per-expert loop;
    yields the list of grouped_mm calls made."""
    calls = []
    if request.param == "loop":
        monkeypatch.setattr(moe_kernel, "_grouped", lambda a, b: False)
    else:
        # The grouped path never reads the routing on the host (a decode step stays capturable in a
        # CUDA graph): the per-expert bounds, one device sync, are the loop's alone.
        monkeypatch.setattr(moe_kernel.Groups, "bounds", property(lambda self: pytest.fail("host read")))
    grouped_mm = torch.nn.functional.grouped_mm
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", lambda *a, **k: calls.append(1) or grouped_mm(*a, **k))
    yield request.param, calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [0, 8])
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_and_backward_match_reference(family, rank, dtype, path):
    experts = experts_module(family).to(dtype)
    g = torch.Generator().manual_seed(2)
    index, weights = routing(29, experts.num_experts, 2, g, fp32_weights=family == "mixtral", dtype=dtype)
    weights.requires_grad_()
    hidden = torch.randn(29, 64, generator=g).to(dtype).requires_grad_()
    gate_up, down = projections(experts, rank, g, dtype)
    out = moe_experts(hidden, index, weights, gate_up, down, experts._apply_gate)
    ref = reference_moe(hidden, index, weights, gate_up, down, experts._apply_gate)
    assert out.dtype == dtype and out.shape == hidden.shape
    assert rel_err(out, ref) < TOL[dtype]
    inputs = [hidden, weights] + [t for p in (gate_up, down) for t in (p.lora_A, p.lora_B) if t is not None]
    dy = torch.randn(out.shape, generator=g).to(dtype)
    grads = torch.autograd.grad(out, inputs, dy)
    grads_ref = torch.autograd.grad(ref, inputs, dy)
    for t, got, want in zip(inputs, grads, grads_ref):
        assert got.dtype == t.dtype and torch.isfinite(got).all()
        assert rel_err(got, want) < TOL[dtype]
    name, calls = path
    # Every tiny family's operands are 16-byte aligned: the grouped path runs whenever it is allowed.
    assert bool(calls) == (name == "grouped"), len(calls)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_odd_shapes_take_the_per_expert_loop(dtype, monkeypatch):
    # 37 / 19 columns are no 16-byte rows: grouped_mm cannot take them, the loop must (and agree).
    calls = []
    grouped_mm = torch.nn.functional.grouped_mm
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", lambda *a, **k: calls.append(1) or grouped_mm(*a, **k))
    g = torch.Generator().manual_seed(5)
    e, h, i, r = 5, 37, 19, 3

    def gate(x):
        return torch.nn.functional.silu(x[..., :i]) * x[..., i:]

    def lora(out_f, in_f):
        return dict(lora_A=(0.1 * torch.randn(e, r, in_f, generator=g)).to(dtype).requires_grad_(),
                    lora_B=(0.1 * torch.randn(e, out_f, r, generator=g)).to(dtype).requires_grad_(), scaling=0.5)

    gate_up = ExpertProjection(weight=(0.2 * torch.randn(e, 2 * i, h, generator=g)).to(dtype), **lora(2 * i, h))
    down = ExpertProjection(weight=(0.2 * torch.randn(e, h, i, generator=g)).to(dtype), **lora(h, i))
    index, weights = routing(23, e, 3, g, dtype=dtype, skip=(0, 4))
    hidden = torch.randn(23, h, generator=g).to(dtype).requires_grad_()
    out = moe_experts(hidden, index, weights, gate_up, down, gate)
    ref = reference_moe(hidden, index, weights, gate_up, down, gate)
    assert rel_err(out, ref) < TOL[dtype] and not calls
    inputs = [hidden, gate_up.lora_A, gate_up.lora_B, down.lora_A, down.lora_B]
    dy = torch.randn(out.shape, generator=g).to(dtype)
    for got, want in zip(torch.autograd.grad(out, inputs, dy), torch.autograd.grad(ref, inputs, dy)):
        assert rel_err(got, want) < TOL[dtype]
    assert gate_up.lora_A.grad is None  # autograd.grad leaves .grad alone


def nf4_projections(experts):
    """(nf4 projections, dense projections of the dequantised weights) by bitsandbytes.

    bitsandbytes dequantises the stack viewed as [-1, 64] rows: its CPU dequantize_4bit (0.50.2)
    is wrong for a last dimension that is not a multiple of the blocksize (Qwen3's down_proj
    [E, H, 48] comes back up to 4x off), while the packed codes and absmax of any view of the
    same flattened values are the same.
    """
    import bitsandbytes.functional as bnbf

    nf4, dense = [], []
    for projection in projections(experts):
        weight = projection.weight.contiguous()
        packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
        rows, rows_state = bnbf.quantize_4bit(weight.reshape(-1, 64), blocksize=64, compress_statistics=True,
                                              quant_type="nf4")
        assert torch.equal(rows, packed) and torch.equal(rows_state.absmax, state.absmax)
        nf4.append(ExpertProjection(nf4=(packed.reshape(-1), state), bias=projection.bias,
                                    transposed=projection.transposed))
        dense.append(ExpertProjection(weight=bnbf.dequantize_4bit(rows, rows_state).reshape(weight.shape),
                                      bias=projection.bias, transposed=projection.transposed))
    return nf4, dense


@pytest.mark.parametrize("family", FAMILIES)
def test_nf4_weights_dequantise_as_bitsandbytes(family):
    experts = experts_module(family)
    nf4, dense = nf4_projections(experts)
    for q, d in zip(nf4, dense):
        assert torch.equal(q.dense(torch.float32), d.dense(torch.float32))  # bit-identical


def test_nf4_blocks_stay_inside_one_expert():
    # Quantising the stack at once gives each expert the codes and absmax it gets alone: no block
    # mixes two experts (each holds a multiple of 64 values).
    import bitsandbytes.functional as bnbf

    weight = torch.randn(3, 48, 64)
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type="nf4")
    per_expert = weight[0].numel() // 2
    for e in range(3):
        alone, alone_state = bnbf.quantize_4bit(weight[e].contiguous(), blocksize=64, compress_statistics=False,
                                                quant_type="nf4")
        assert torch.equal(packed.reshape(-1)[e * per_expert:(e + 1) * per_expert], alone.reshape(-1))
        assert torch.equal(state.absmax.reshape(3, -1)[e], alone_state.absmax)


@pytest.mark.parametrize("family", FAMILIES)
def test_nf4_experts_with_lora_equal_dequantised_reference(family):
    experts = experts_module(family)
    g = torch.Generator().manual_seed(3)
    index, weights = routing(17, experts.num_experts, 2, g, fp32_weights=family == "mixtral")
    hidden = torch.randn(17, 64, generator=g).requires_grad_()
    nf4, dense = nf4_projections(experts)
    lora = projections(experts, 4, g)
    nf4 = [ExpertProjection(nf4=q.nf4, bias=q.bias, transposed=q.transposed, lora_A=l.lora_A, lora_B=l.lora_B,
                            scaling=l.scaling) for q, l in zip(nf4, lora)]
    dense = [ExpertProjection(weight=d.weight, bias=d.bias, transposed=d.transposed, lora_A=l.lora_A,
                              lora_B=l.lora_B, scaling=l.scaling) for d, l in zip(dense, lora)]
    out = moe_experts(hidden, index, weights, *nf4, experts._apply_gate)
    ref = reference_moe(hidden, index, weights, *dense, experts._apply_gate)
    assert rel_err(out, ref) < 1e-5
    inputs = [hidden] + [t for p in lora for t in (p.lora_A, p.lora_B)]
    dy = torch.randn(out.shape, generator=g)
    for got, want in zip(torch.autograd.grad(out, inputs, dy), torch.autograd.grad(ref, inputs, dy)):
        assert rel_err(got, want) < 1e-5


def test_backward_keeps_no_dense_expert_weight():
    # The point of the op: autograd keeps the routed rows' G and Y, never a [E, out, in] weight
    # (dequantised, or W + s B A), which the reference path keeps for every layer.
    experts = experts_module("qwen3_moe")
    g = torch.Generator().manual_seed(4)
    index, weights = routing(16, experts.num_experts, 2, g)
    hidden = torch.randn(16, 64, generator=g).requires_grad_()
    nf4, _ = nf4_projections(experts)
    lora = projections(experts, 4, g)
    nf4 = [ExpertProjection(nf4=q.nf4, lora_A=l.lora_A, lora_B=l.lora_B, scaling=2.0) for q, l in zip(nf4, lora)]
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        moe_experts(hidden, index, weights, *nf4, experts._apply_gate)
    stacked = min(experts.gate_up_proj.numel(), experts.down_proj.numel())
    assert sizes and max(sizes) < stacked, (sizes, stacked)


def test_full_finetuning_of_experts_is_refused():
    experts = experts_module("mixtral")
    gate_up, down = projections(experts)
    gate_up = ExpertProjection(weight=gate_up.weight.clone().requires_grad_(), transposed=False)
    index, weights = routing(4, 4, 2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="full fine-tuning"):
        moe_experts(torch.randn(4, 64), index, weights, gate_up, down, experts._apply_gate)


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_bf16_nf4_lora_matches_reference(family):
    # The GPU path: Triton NF4 dequantisation of whole stacks and torch's CUDA grouped_mm (bf16,
    # sm80+), against the reference on the same GPU.
    experts = experts_module(family).cuda()
    g = torch.Generator().manual_seed(6)
    index, weights = routing(64, experts.num_experts, 2, g, fp32_weights=family == "mixtral", dtype=torch.bfloat16)
    index, weights = index.cuda(), weights.cuda()
    hidden = torch.randn(64, 64, generator=g).to("cuda", torch.bfloat16).requires_grad_()
    nf4, dense = nf4_projections(experts)
    lora = projections(experts, 16, g)
    nf4 = [ExpertProjection(nf4=q.nf4, bias=None if q.bias is None else q.bias.bfloat16(), transposed=q.transposed,
                            lora_A=l.lora_A.detach().cuda().requires_grad_(), lora_B=l.lora_B.detach().cuda().requires_grad_(),
                            scaling=2.0) for q, l in zip(nf4, lora)]
    calls = []
    grouped_mm = torch.nn.functional.grouped_mm
    torch.nn.functional.grouped_mm = lambda *a, **k: calls.append(1) or grouped_mm(*a, **k)
    try:
        out = moe_experts(hidden, index, weights, *nf4, experts._apply_gate)
    finally:
        torch.nn.functional.grouped_mm = grouped_mm
    ref = reference_moe(hidden, index, weights, *nf4, experts._apply_gate)
    assert calls and rel_err(out, ref) < TOL[torch.bfloat16]
    inputs = [hidden] + [t for p in nf4 for t in (p.lora_A, p.lora_B)]
    dy = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, inputs, dy), torch.autograd.grad(ref, inputs, dy)):
        assert rel_err(got, want) < TOL[torch.bfloat16]


def test_a_layout_grouped_mm_refuses_falls_back_to_the_loop_once(monkeypatch, caplog):
    monkeypatch.setattr(moe_kernel, "_REFUSED", set())

    def refuse(*args, **kwargs):
        raise RuntimeError("mat_b must be column-major")

    monkeypatch.setattr(torch.nn.functional, "grouped_mm", refuse)
    experts = experts_module("qwen3_moe")
    g = torch.Generator().manual_seed(7)
    index, weights = routing(9, experts.num_experts, 2, g)
    hidden = torch.randn(9, 64, generator=g)
    gate_up, down = projections(experts, 8, g)
    with caplog.at_level("WARNING", logger="tuneforge.kernels.moe"):
        out = moe_experts(hidden, index, weights, gate_up, down, experts._apply_gate)
        moe_experts(hidden, index, weights, gate_up, down, experts._apply_gate)
    assert rel_err(out, reference_moe(hidden, index, weights, gate_up, down, experts._apply_gate)) < 1e-5
    refusals = [r for r in caplog.records if "grouped_mm refused" in r.getMessage()]
    assert refusals and len(refusals) == len(moe_kernel._REFUSED)  # once per layout, not per call
