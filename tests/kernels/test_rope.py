"""RoPE: the kernel equals transformers' apply_rotary_pos_emb forward and backward, and
rope_cos_sin equals transformers' rotary embedding module for every supported rope type.

Tolerances (relative error ||out - ref|| / ||ref||):
- fp32 1e-5: the kernel does the same products and sums as transformers (bit-equal on CPU);
  a GPU may fuse them into FMAs (~1e-7).
- bf16 1e-2: transformers rounds q*cos and rotate_half(q)*sin to bf16 before adding, the kernel
  rounds once (and the CPU interpreter truncates fp32 -> bf16): one or two bf16 ulps.
"""

import pytest
import torch
from transformers import Gemma3TextConfig, LlamaConfig
from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from tuneforge.kernels.rope import SUPPORTED_ROPE_TYPES, apply_rope, reference_apply_rope, rope_cos_sin

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}

# max_position_embeddings is 32 below: positions up to 56 cross it (and the original 16), so the
# "dynamic" and "longrope" variants switch to their long-context frequencies.
ROPE_PARAMETERS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
    },
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 16},
    "longrope": {
        "rope_type": "longrope", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 16,
        "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [1.0 + 0.5 * i for i in range(8)],
    },
}
POSITIONS = {
    "short": lambda: torch.arange(17)[None],
    "long, batch 2": lambda: torch.stack([torch.arange(40, 57), torch.arange(3, 20)]),
}


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def llama_config(rope_type):
    return LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        rope_parameters=dict(ROPE_PARAMETERS[rope_type]),
    )


def qk(batch, q_heads, k_heads, seq, head_dim, dtype, transposed):
    """q, k as the attention layer makes them: [B, S, H, D] projections viewed as [B, H, S, D]."""
    if transposed:
        q = torch.randn(batch, seq, q_heads, head_dim, device=DEVICE, dtype=dtype).transpose(1, 2)
        k = torch.randn(batch, seq, k_heads, head_dim, device=DEVICE, dtype=dtype).transpose(1, 2)
    else:
        q = torch.randn(batch, q_heads, seq, head_dim, device=DEVICE, dtype=dtype)
        k = torch.randn(batch, k_heads, seq, head_dim, device=DEVICE, dtype=dtype)
    return q.requires_grad_(), k.requires_grad_()


def check_forward_backward(q, k, cos, sin, dtype):
    out = apply_rope(q, k, cos, sin)
    ref = apply_rotary_pos_emb(q, k, cos, sin)
    grads_out = [torch.randn_like(t) for t in ref]
    for o, r in zip(out, ref):
        assert o.shape == r.shape and o.dtype == dtype
        assert rel_err(o, r) < TOL[dtype]
    grads = torch.autograd.grad(out, (q, k), grads_out)
    grads_ref = torch.autograd.grad(ref, (q, k), grads_out)
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq", [1, 17])
@pytest.mark.parametrize(
    "batch,q_heads,k_heads,head_dim,transposed",
    [
        (1, 4, 2, 64, False),  # GQA, contiguous
        (2, 3, 1, 96, True),  # odd head counts, half of head_dim not a power of two, strided views
    ],
)
def test_kernel_matches_transformers_with_real_cos_sin(batch, q_heads, k_heads, head_dim, transposed, seq, dtype):
    config = LlamaConfig(hidden_size=q_heads * head_dim, num_attention_heads=q_heads, num_key_value_heads=k_heads)
    position_ids = torch.arange(5, 5 + seq, device=DEVICE)[None].expand(batch, -1)
    q, k = qk(batch, q_heads, k_heads, seq, head_dim, dtype, transposed)
    cos, sin = LlamaRotaryEmbedding(config).to(DEVICE)(q, position_ids)
    check_forward_backward(q, k, cos, sin, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cos_sin_with_batch_one_broadcast_and_unequal_halves(dtype):
    # transformers passes [1, S, D] cos/sin for a batch when position_ids default to [1, S];
    # random cos/sin (halves not equal) check the general rotate_half map and its transpose.
    q, k = qk(2, 4, 2, 17, 64, dtype, transposed=True)
    cos = torch.randn(1, 17, 64, device=DEVICE, dtype=dtype)
    sin = torch.randn(1, 17, 64, device=DEVICE, dtype=dtype)
    check_forward_backward(q, k, cos, sin, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_equals_transformers_bit_for_bit(dtype):
    q, k = qk(2, 4, 2, 17, 64, dtype, transposed=True)
    cos = torch.randn(2, 17, 64, device=DEVICE, dtype=dtype)
    sin = torch.randn(2, 17, 64, device=DEVICE, dtype=dtype)
    for ours, theirs in zip(reference_apply_rope(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(ours, theirs)


def test_backward_is_rotation_by_minus_sin():
    # With transformers' cos/sin (equal halves) the gradient is the forward map with -sin.
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    q, k = qk(1, 4, 2, 17, 16, torch.float32, transposed=False)
    cos, sin = LlamaRotaryEmbedding(config).to(DEVICE)(q, torch.arange(17, device=DEVICE)[None])
    dq_out, dk_out = torch.randn_like(q), torch.randn_like(k)
    dq, dk = torch.autograd.grad(apply_rope(q, k, cos, sin), (q, k), (dq_out, dk_out))
    dq_ref, dk_ref = reference_apply_rope(dq_out, dk_out, cos, -sin)
    assert rel_err(dq, dq_ref) < TOL[torch.float32]
    assert rel_err(dk, dk_ref) < TOL[torch.float32]


def test_inputs_are_not_modified_and_layout_is_kept():
    q, k = qk(2, 4, 2, 17, 64, torch.float32, transposed=True)
    q0, k0 = q.detach().clone(), k.detach().clone()
    cos = torch.randn(2, 17, 64, device=DEVICE)
    sin = torch.randn(2, 17, 64, device=DEVICE)
    q_rot, k_rot = apply_rope(q, k, cos, sin)
    assert torch.equal(q, q0) and torch.equal(k, k0)
    assert q_rot.stride() == q.stride() and k_rot.stride() == k.stride()


@pytest.mark.parametrize("rope_type", SUPPORTED_ROPE_TYPES)
@pytest.mark.parametrize("positions", list(POSITIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_cos_sin_equals_transformers_module(rope_type, positions, dtype):
    config = llama_config(rope_type)
    position_ids = POSITIONS[positions]().to(DEVICE)
    x = torch.zeros(1, device=DEVICE, dtype=dtype)
    # A fresh module per call: transformers' module also remembers the longest sequence seen.
    cos_ref, sin_ref = LlamaRotaryEmbedding(config).to(DEVICE)(x, position_ids)
    cos, sin = rope_cos_sin(config, position_ids, DEVICE, dtype)
    assert cos.dtype == dtype and cos.shape == (position_ids.shape[0], 17, 16)
    assert torch.equal(cos, cos_ref) and torch.equal(sin, sin_ref)


@pytest.mark.parametrize("layer_type", ["sliding_attention", "full_attention"])
def test_rope_cos_sin_per_layer_type_equals_gemma3(layer_type):
    config = Gemma3TextConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
        num_hidden_layers=2, vocab_size=100, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
        },
    )
    position_ids = torch.arange(17, device=DEVICE)[None]
    x = torch.zeros(1, device=DEVICE)
    cos_ref, sin_ref = Gemma3RotaryEmbedding(config).to(DEVICE)(x, position_ids, layer_type)
    cos, sin = rope_cos_sin(config, position_ids, DEVICE, layer_type=layer_type)
    assert torch.equal(cos, cos_ref) and torch.equal(sin, sin_ref)
    with pytest.raises(ValueError, match="pass layer_type"):
        rope_cos_sin(config, position_ids, DEVICE)


def test_bad_inputs_raise_clear_errors():
    q, k = qk(1, 4, 2, 17, 64, torch.float32, transposed=False)
    cos = torch.randn(1, 17, 64, device=DEVICE)
    with pytest.raises(ValueError, match=r"cos and sin must both be \[batch or 1, seq, head_dim\]"):
        apply_rope(q, k, cos[:, :16], cos[:, :16])
    with pytest.raises(NotImplementedError, match="detached"):
        apply_rope(q, k, cos.requires_grad_(), cos)
    config = llama_config("default")
    config.rope_parameters = {"rope_type": "proportional", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(NotImplementedError, match="rope_type 'proportional' is not supported"):
        rope_cos_sin(config, torch.arange(4)[None])
