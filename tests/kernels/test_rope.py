"""RoPE: the in-place kernel equals transformers' apply_rotary_pos_emb forward and backward, and
rope_cos_sin equals transformers' rotary embedding module for every supported rope type.

The kernel takes q/k in the projections' layout [B, S, H * D] (or [B, S, H, D]) and rotates
them in place; transformers' function takes the [B, H, S, D] per-head views of the same
tensors, which `heads_first` makes.

Tolerances (relative error ||out - ref|| / ||ref||):
- fp32 1e-5: the kernel does the same products and sums as transformers (bit-equal on CPU);
  a GPU may fuse them into FMAs (~1e-7).
- bf16 1e-2: transformers rounds q*cos and rotate_half(q)*sin to bf16 before adding, the kernel
  rounds once (and the CPU interpreter truncates fp32 -> bf16): one or two bf16 ulps.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import Gemma3TextConfig, LlamaConfig
from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from kernel_checks import rel_err
from tuneforge.kernels.rope import apply_rope, reference_apply_rope
from tuneforge.testing.rope_tables import SUPPORTED_ROPE_TYPES, rope_cos_sin

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


def llama_config(rope_type):
    return LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        rope_parameters=dict(ROPE_PARAMETERS[rope_type]),
    )


def heads_first(t, head_dim):
    """[B, S, H * D] or [B, S, H, D] -> the [B, H, S, D] view transformers' attention rotates."""
    return t.unflatten(-1, (-1, head_dim)).transpose(1, 2) if t.dim() == 3 else t.transpose(1, 2)


def leaves(batch, q_heads, k_heads, seq, head_dim, dtype, layout="flat"):
    """q, k leaves in the projections' layout: [B, S, H * D] ("flat") or [B, S, H, D] ("heads")."""
    def make(heads):
        shape = (batch, seq, heads * head_dim) if layout == "flat" else (batch, seq, heads, head_dim)
        return torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True)

    return make(q_heads), make(k_heads)


def check_forward_backward(q_leaf, k_leaf, cos, sin, head_dim, dtype, inplace=True):
    """The kernel on copies of the leaves (in place) vs transformers on their per-head views."""
    q, k = q_leaf.clone(), k_leaf.clone()  # not leaves: autograd lets them be modified in place
    storage = (q.data_ptr(), k.data_ptr())
    out = apply_rope(q, k, cos, sin, head_dim, inplace=inplace)
    assert ((out[0].data_ptr(), out[1].data_ptr()) == storage) is inplace
    ref = apply_rotary_pos_emb(heads_first(q_leaf, head_dim), heads_first(k_leaf, head_dim), cos, sin)
    for o, r, t in zip(out, ref, (q_leaf, k_leaf)):
        assert o.shape == t.shape and o.dtype == dtype
        assert rel_err(heads_first(o, head_dim), r) < TOL[dtype]
    grads_out = [torch.randn_like(t) for t in out]
    # The backward rotates the gradients it is handed in place: give it copies.
    grads = torch.autograd.grad(out, (q_leaf, k_leaf), [g.clone() for g in grads_out])
    grads_ref = torch.autograd.grad(ref, (q_leaf, k_leaf), [heads_first(g, head_dim) for g in grads_out])
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq", [1, 17])
@pytest.mark.parametrize(
    "batch,q_heads,k_heads,head_dim,layout",
    [
        (1, 4, 2, 64, "flat"),  # GQA: k heads fewer than q heads
        (2, 3, 1, 96, "heads"),  # odd head counts, half of head_dim not a power of two, 4D layout
    ],
)
def test_kernel_matches_transformers_in_place(batch, q_heads, k_heads, head_dim, layout, seq, dtype):
    config = LlamaConfig(hidden_size=q_heads * head_dim, num_attention_heads=q_heads, num_key_value_heads=k_heads)
    position_ids = torch.arange(5, 5 + seq, device=DEVICE)[None].expand(batch, -1)
    q, k = leaves(batch, q_heads, k_heads, seq, head_dim, dtype, layout)
    cos, sin = LlamaRotaryEmbedding(config).to(DEVICE)(q, position_ids)
    check_forward_backward(q, k, cos, sin, head_dim, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope_type", SUPPORTED_ROPE_TYPES)
def test_kernel_with_every_scaling_variant(rope_type, dtype):
    # yarn and longrope scale cos/sin by their attention factor (cos^2 + sin^2 != 1); dynamic and
    # longrope switch frequencies past their original length (positions up to 56).
    config = llama_config(rope_type)
    position_ids = POSITIONS["long, batch 2"]().to(DEVICE)
    q, k = leaves(2, 4, 2, 17, 16, dtype)
    cos, sin = rope_cos_sin(config, position_ids, DEVICE, dtype)
    check_forward_backward(q, k, cos, sin, 16, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cos_sin_with_batch_one_broadcast_and_unequal_halves(dtype):
    # transformers passes [1, S, D] cos/sin for a batch when position_ids default to [1, S];
    # random cos/sin (halves not equal) check the general rotate_half map and its transpose.
    q, k = leaves(2, 4, 2, 17, 64, dtype)
    cos = torch.randn(1, 17, 64, device=DEVICE, dtype=dtype)
    sin = torch.randn(1, 17, 64, device=DEVICE, dtype=dtype)
    check_forward_backward(q, k, cos, sin, 64, dtype)


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("head_dim,rotary", [(64, 32), (80, 24)])
def test_partial_rotary_turns_the_leading_dims_only(head_dim, rotary, inplace):
    # StableLM / Phi-4-mini: cos/sin cover the first `rotary` dims of each head; transformers
    # rotates that slice and concatenates the rest (reference_apply_rope does the same).
    q_leaf, k_leaf = leaves(2, 3, 1, 17, head_dim, torch.float32)
    cos, sin = torch.randn(2, 17, rotary, device=DEVICE), torch.randn(2, 17, rotary, device=DEVICE)
    q, k = q_leaf.clone(), k_leaf.clone()
    out = apply_rope(q, k, cos, sin, head_dim, inplace=inplace)
    ref = reference_apply_rope(heads_first(q_leaf, head_dim), heads_first(k_leaf, head_dim), cos, sin)
    grads_out = [torch.randn_like(t) for t in out]
    grads = torch.autograd.grad(out, (q_leaf, k_leaf), [g.clone() for g in grads_out])
    grads_ref = torch.autograd.grad(ref, (q_leaf, k_leaf), [heads_first(g, head_dim) for g in grads_out])
    for o, r, g, g_ref, t in zip(out, ref, grads, grads_ref, (q_leaf, k_leaf)):
        assert rel_err(heads_first(o, head_dim), r) < TOL[torch.float32]
        assert rel_err(g, g_ref) < TOL[torch.float32]
        # The pass-through dims are exactly the input's (copied out of place, untouched in place).
        assert torch.equal(o.unflatten(-1, (-1, head_dim))[..., rotary:], t.unflatten(-1, (-1, head_dim))[..., rotary:])


def test_reference_partial_rotary_equals_transformers_slice_and_concat():
    q, k = (torch.randn(2, h, 17, 64, device=DEVICE) for h in (4, 2))
    cos, sin = torch.randn(2, 17, 32, device=DEVICE), torch.randn(2, 17, 32, device=DEVICE)
    rotated = apply_rotary_pos_emb(q[..., :32], k[..., :32], cos, sin)
    for ours, theirs, x in zip(reference_apply_rope(q, k, cos, sin), rotated, (q, k)):
        assert torch.equal(ours, torch.cat((theirs, x[..., 32:]), dim=-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_equals_transformers_bit_for_bit(dtype):
    q, k = (torch.randn(2, h, 17, 64, device=DEVICE, dtype=dtype) for h in (4, 2))
    cos = torch.randn(2, 17, 64, device=DEVICE, dtype=dtype)
    sin = torch.randn(2, 17, 64, device=DEVICE, dtype=dtype)
    for ours, theirs in zip(reference_apply_rope(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(ours, theirs)


def test_in_place_output_is_the_input_storage_and_backward_is_rotation_by_minus_sin():
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    q_leaf, k_leaf = leaves(1, 4, 2, 17, 16, torch.float32)
    cos, sin = LlamaRotaryEmbedding(config).to(DEVICE)(q_leaf, torch.arange(17, device=DEVICE)[None])
    q, k = q_leaf.clone(), k_leaf.clone()
    version = q._version
    q_rot, k_rot = apply_rope(q, k, cos, sin, 16)
    assert q_rot is q and k_rot is k and q._version > version  # autograd saw the write
    # With transformers' cos/sin (equal halves) the gradient is the forward map with -sin,
    # written into the incoming gradient's own storage.
    dq_out, dk_out = torch.randn_like(q), torch.randn_like(k)
    dq_in, dk_in = dq_out.clone(), dk_out.clone()
    dq, dk = torch.autograd.grad((q_rot, k_rot), (q_leaf, k_leaf), (dq_in, dk_in))
    assert dq.data_ptr() == dq_in.data_ptr() and dk.data_ptr() == dk_in.data_ptr()
    dq_ref, dk_ref = reference_apply_rope(heads_first(dq_out, 16), heads_first(dk_out, 16), cos, -sin)
    assert rel_err(heads_first(dq, 16), dq_ref) < TOL[torch.float32]
    assert rel_err(heads_first(dk, 16), dk_ref) < TOL[torch.float32]


def test_expanded_gradient_is_copied_not_written_through():
    # q_rot.sum() hands the backward a stride-0 expanded gradient: rotating it in place would
    # race on one element; it must be copied first and the result still equal the reference.
    q_leaf, k_leaf = leaves(2, 3, 1, 5, 16, torch.float32)
    cos, sin = torch.randn(2, 5, 16, device=DEVICE), torch.randn(2, 5, 16, device=DEVICE)
    q_rot, k_rot = apply_rope(q_leaf.clone(), k_leaf.clone(), cos, sin, 16)
    grads = torch.autograd.grad(q_rot.sum() + k_rot.sum(), (q_leaf, k_leaf))
    ref = reference_apply_rope(heads_first(q_leaf, 16), heads_first(k_leaf, 16), cos, sin)
    grads_ref = torch.autograd.grad(ref[0].sum() + ref[1].sum(), (q_leaf, k_leaf))
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) < TOL[torch.float32]


def test_autograd_through_an_attention_layer_matches_transformers():
    # The model's use: projections -> RoPE in place -> per-head view -> SDPA; the weights'
    # gradients equal those of transformers' out-of-place rotation of the same projections.
    hidden, q_heads, k_heads, head_dim, seq = 48, 3, 1, 16, 17
    x = torch.randn(2, seq, hidden, device=DEVICE)
    # Weights scaled as initialisers do (1/sqrt(fan-in)): unscaled ones make the softmax so sharp
    # that the kernel's fused multiply-adds (vs eager's separate mul and add) reach 1e-5 on the GPU.
    wq, wk, wv = (torch.randn(heads * head_dim, hidden, device=DEVICE).div_(hidden ** 0.5).requires_grad_()
                  for heads in (q_heads, k_heads, k_heads))
    config = LlamaConfig(hidden_size=hidden, num_attention_heads=q_heads, num_key_value_heads=k_heads)
    cos, sin = LlamaRotaryEmbedding(config).to(DEVICE)(x, torch.arange(seq, device=DEVICE)[None])

    def attention(rotate):
        q, k, v = F.linear(x, wq), F.linear(x, wk), F.linear(x, wv)
        q, k = rotate(q, k)
        q, k, v = (heads_first(t, head_dim) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return (out.transpose(1, 2).flatten(2) ** 2).sum()

    ours = attention(lambda q, k: apply_rope(q, k, cos, sin, head_dim))
    theirs = attention(lambda q, k: tuple(
        t.transpose(1, 2).flatten(2)
        for t in apply_rotary_pos_emb(heads_first(q, head_dim), heads_first(k, head_dim), cos, sin)
    ))
    assert rel_err(ours, theirs) < TOL[torch.float32]
    for g, g_ref in zip(torch.autograd.grad(ours, (wq, wk, wv)), torch.autograd.grad(theirs, (wq, wk, wv))):
        assert rel_err(g, g_ref) < TOL[torch.float32]


def test_views_go_out_of_place_and_in_place_on_views_is_refused():
    # Phi-3's packed qkv_proj split into q and k: views that need grad. Autograd refuses to let a
    # two-output Function modify them in place; inplace=False rotates them into new tensors.
    x = torch.randn(2, 17, 32, device=DEVICE)
    w = torch.randn(32, (4 + 2 * 2) * 16, device=DEVICE, requires_grad=True)
    cos, sin = torch.randn(1, 17, 16, device=DEVICE), torch.randn(1, 17, 16, device=DEVICE)
    q, k, _ = (x @ w).split((64, 32, 32), dim=-1)
    q0, k0 = q.detach().clone(), k.detach().clone()
    q_rot, k_rot = apply_rope(q, k, cos, sin, 16, inplace=False)
    assert torch.equal(q, q0) and torch.equal(k, k0) and q_rot.is_contiguous()
    ref = reference_apply_rope(heads_first(q, 16), heads_first(k, 16), cos, sin)
    assert rel_err(heads_first(q_rot, 16), ref[0]) < TOL[torch.float32]
    grad, = torch.autograd.grad((q_rot ** 2).sum() + (k_rot ** 2).sum(), w, retain_graph=True)
    grad_ref, = torch.autograd.grad((ref[0] ** 2).sum() + (ref[1] ** 2).sum(), w)
    assert rel_err(grad, grad_ref) < TOL[torch.float32]
    with pytest.raises(RuntimeError, match="view"):
        apply_rope(q, k, cos, sin, 16)


def test_overwriting_a_tensor_saved_for_backward_is_caught_by_autograd():
    # mark_dirty bumps the version counter: an op that saved q (here exp saves its output) fails
    # loudly at backward instead of differentiating the rotated values.
    q_leaf, k_leaf = leaves(1, 2, 1, 5, 16, torch.float32)
    q = q_leaf.exp()
    cos, sin = torch.randn(1, 5, 16, device=DEVICE), torch.randn(1, 5, 16, device=DEVICE)
    q_rot, k_rot = apply_rope(q, k_leaf.clone(), cos, sin, 16)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (q_rot.sum() + k_rot.sum()).backward()


def test_bad_inputs_raise_clear_errors():
    q, k = (torch.randn(1, 17, h * 64, device=DEVICE) for h in (4, 2))
    cos = torch.randn(1, 17, 64, device=DEVICE)
    with pytest.raises(ValueError, match=r"cos and sin must both be \[batch or 1, seq, rotary_dim\]"):
        apply_rope(q, k, cos[:, :16], cos[:, :16], 64)
    with pytest.raises(ValueError, match="must be even and at most head_dim 32"):
        apply_rope(q, k, cos, cos, 32)
    with pytest.raises(ValueError, match=r"q must be \[batch, seq, heads \* head_dim\]"):
        apply_rope(q[..., :100], k, cos, cos, 64)
    with pytest.raises(ValueError, match="unit stride along its last dim"):
        apply_rope(q.unflatten(-1, (64, 4)).transpose(-1, -2), k, cos, cos, 64)
    with pytest.raises(NotImplementedError, match="detached"):
        apply_rope(q, k, cos.requires_grad_(), cos, 64)
    config = llama_config("default")
    config.rope_parameters = {"rope_type": "proportional", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(NotImplementedError, match="rope_type 'proportional' is not supported"):
        rope_cos_sin(config, torch.arange(4)[None])


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
