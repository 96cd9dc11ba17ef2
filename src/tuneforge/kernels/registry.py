"""Every op in `tuneforge.kernels`, with its reference, its test and its benchmark case.

An op module holds the kernel(s), the autograd Function, the public function and a plain-PyTorch
reference (STYLE.md, habit 1). `OPS` names, per op: the module, the public function, the
reference, the test file under tests/kernels/ that compares them, and the case name in
bench/kernels.py `cases()`. `bench` is None where `cases()` has no case for the op:

- layer_norm, moe_experts, varlen_attention, the LoRA ops and the grouped projections have none;
- nf4_matmul is timed by its own sweep (`bench/kernels.py --only nf4_matmul`, `run_nf4_matmul`),
  outside `cases()`.

`extras` are the other public names of the op's module (its Function, data types, helpers other
modules use). Modules of kernels/ that hold no op are listed in SUPPORT. tests/kernels/
test_registry.py checks the table against the package, the tests and the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["OPS", "SUPPORT", "Op"]


@dataclass(frozen=True)
class Op:
    """One op: `tuneforge.kernels.<module>.<function>`, compared with `<reference>` in tests/kernels/<test>."""

    name: str
    module: str
    function: str
    reference: str
    test: str
    bench: str | None
    extras: tuple[str, ...] = ()


OPS: tuple[Op, ...] = (
    Op("rms_norm", "rms_norm", "rms_norm", "reference_rms_norm", "test_rms_norm.py", "rms_norm",
       ("RMSNormFunction",)),
    Op("layer_norm", "layer_norm", "layer_norm", "reference_layer_norm", "test_layer_norm.py", None,
       ("LayerNormFunction",)),
    Op("swiglu", "swiglu", "swiglu", "reference_swiglu", "test_swiglu.py", "swiglu", ("SwiGLUFunction",)),
    Op("geglu", "geglu", "geglu", "reference_geglu", "test_geglu.py", "geglu_tanh", ("GeGLUFunction",)),
    Op("rope", "rope", "apply_rope", "reference_apply_rope", "test_rope.py", "rope", ("RoPEFunction",)),
    Op("fused_linear_cross_entropy", "cross_entropy", "fused_linear_cross_entropy", "reference_linear_cross_entropy",
       "test_cross_entropy.py", "fused_linear_cross_entropy", ("LinearCrossEntropyFunction", "check_labels")),
    Op("varlen_attention", "varlen_attention", "varlen_attention", "reference_varlen_attention",
       "test_varlen_attention.py", None, ("flash_varlen_supported",)),
    Op("softcap_attention", "softcap_attention", "softcap_attention", "reference_softcap_attention",
       "test_softcap_attention.py", "softcap_attention (Gemma 2)", ("dense_softcap_attention", "softcap_supported")),
    Op("moe_experts", "moe", "moe_experts", "reference_moe", "test_moe.py", None,
       ("ExpertProjection", "Groups", "MoEExperts", "dequantize_stack")),
    Op("rank_update", "rank_update", "rank_update_", "reference_rank_update", "test_rank_update.py",
       "lora_rank_update (y += s*XA@B^T)", ("launch_rank_update_",)),
    Op("dequantize_nf4", "nf4", "dequantize_nf4", "reference_dequantize_nf4", "test_nf4.py", "nf4_dequantize",
       ("block_absmax", "dense_weight", "dequantize_nf4_rows")),
    Op("nf4_matmul", "nf4_gemv", "nf4_matmul", "reference_nf4_matmul", "test_nf4_gemv.py", None,
       ("GemvConfig", "default_config", "nf4_matmul_unsupported")),
    Op("lora_linear", "lora", "lora_linear", "reference_lora_linear", "test_lora.py", None,
       ("LoRAProjection", "LoRALinearFunction", "projection_forward", "check_inputs")),
    Op("lora_qkv", "lora", "lora_qkv", "reference_lora_qkv", "test_lora.py", None, ("LoRAQKVFunction",)),
    Op("lora_mlp", "lora", "lora_mlp", "reference_lora_mlp", "test_lora.py", None,
       ("LoRAMLPFunction", "check_activation", "gated")),
    Op("group_forward", "lora_group", "group_forward", "reference_group_forward", "test_lora_group.py", None,
       ("Projection", "ProjectionGroup", "groupable", "warm_up")),
    Op("group_backward", "lora_group", "group_backward", "reference_group_backward", "test_lora_group.py", None),
)

# Modules of tuneforge.kernels that hold no op: shared launch/check helpers, the cached Triton
# launch, the per-step cache of compute-dtype weights, and this table.
SUPPORT: tuple[str, ...] = ("_utils", "launcher", "weight_cache", "registry")
