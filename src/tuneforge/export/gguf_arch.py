"""What llama.cpp expects of each architecture, as data: metadata, tensor layout, unsupported configs.

One `GGUFArch` per supported llama.cpp architecture. The GGUF writer asks the table; it never
branches on a family name. Facts behind the entries (from llama.cpp's loader and converter):

- llama: llama.cpp applies "normal" (interleaved-pair) RoPE, so the HF q_proj / k_proj rows,
  which are laid out for rotate-half RoPE, are permuted per head:
  `w.reshape(n_head, 2, d_head // 2, in).swapaxes(1, 2).reshape(out, in)`.
- qwen2: NeoX RoPE like HF, so no permutation; q/k/v carry biases.
- gemma3: the RMSNorm weight is stored as `w` but applied as `1 + w`; llama.cpp applies it
  as stored, so the exporter writes `w + 1`. llama.cpp itself scales the token embeddings by
  sqrt(hidden) (as HF does), so they are written unscaled. Every 6th layer is global
  attention and the sliding layers use RoPE base 10000: both fixed in llama.cpp, so a config
  that says otherwise cannot be represented and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


class UnsupportedForGGUF(ValueError):
    """The model's config asks for something llama.cpp's architecture cannot represent."""


@dataclass(frozen=True)
class GGUFArch:
    """name: llama.cpp architecture; model_types: HF `config.model_type` values mapped to it.

    permute_qk:  permute q_proj / k_proj rows from rotate-half to interleaved RoPE order.
    norm_offset: added to every `*norm.weight` (Gemma's `1 + w` RMSNorm).
    metadata:    writes the arch-specific keys: (writer, config) -> None.
    check:       raises UnsupportedForGGUF for configs llama.cpp cannot run as HF does.
    """

    name: str
    model_types: tuple[str, ...]
    permute_qk: bool = False
    norm_offset: float = 0.0
    metadata: Callable | None = None
    check: Callable | None = None

    def transform(self, gguf_name: str, tensor: torch.Tensor, config) -> torch.Tensor:
        """tensor: the HF tensor (fp32) -> the tensor llama.cpp expects under `gguf_name`."""
        if self.permute_qk and gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
            tensor = permute_rotary(tensor, config.num_attention_heads)
        elif self.permute_qk and gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
            tensor = permute_rotary(tensor, config.num_key_value_heads)
        if self.norm_offset and gguf_name.endswith("norm.weight"):
            tensor = tensor + self.norm_offset
        return tensor


def permute_rotary(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """weight: [n_head * d_head, ...] rotate-half rows -> interleaved-pair rows (same shape).

    HF keeps a head's rotary pairs as (i, i + d_head/2); llama.cpp's normal RoPE pairs (2i, 2i+1).
    """
    shape = weight.shape
    return weight.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_parameters(config, layer_type: str | None = None) -> dict:
    """transformers 5 keeps RoPE settings in `rope_parameters`, per layer type for Gemma 3."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if layer_type is not None and layer_type in params:
        params = dict(params[layer_type])
    return params


def _common(writer, config, arch: GGUFArch, rope: dict) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_vocab_size(config.vocab_size)
    dim = head_dim(config)
    writer.add_rope_dimension_count(dim)
    if dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    _rope_scaling(writer, rope, arch)


def _rope_scaling(writer, rope: dict, arch: GGUFArch) -> None:
    import gguf

    kind = rope.get("rope_type", "default")
    if kind == "default":
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        return
    if kind == "llama3" and arch.name == "llama":
        return  # carried by the rope_freqs tensor (see extra_tensors)
    raise UnsupportedForGGUF(f"RoPE scaling {kind!r} is not exported to GGUF for {arch.name} yet "
                             "(supported: default, linear, and llama3 for Llama)")


def extra_tensors(arch: GGUFArch, config) -> dict[str, torch.Tensor]:
    """Tensors llama.cpp needs that the HF checkpoint does not store.

    Llama 3.1+ RoPE scaling: llama.cpp divides each rotary frequency by `rope_freqs[i]`, so the
    factors are (unscaled inverse frequency) / (llama3-scaled inverse frequency), both taken from
    transformers' own RoPE initialisers so the two runtimes rotate identically.
    """
    rope = rope_parameters(config)
    if arch.name != "llama" or rope.get("rope_type") != "llama3":
        return {}
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    dim = head_dim(config)
    theta = float(rope["rope_theta"])
    plain = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    return {"rope_freqs.weight": (plain / scaled.double()).float()}


def _llama_check(config) -> None:
    if getattr(config, "mlp_bias", False):
        raise UnsupportedForGGUF("llama with mlp_bias=true has no llama.cpp tensor for the MLP biases")


def _qwen2_check(config) -> None:
    if getattr(config, "use_sliding_window", False):
        raise UnsupportedForGGUF("qwen2 with use_sliding_window=true: llama.cpp's qwen2 has no sliding window")


def _gemma3_metadata(writer, config) -> None:
    writer.add_sliding_window(config.sliding_window)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))


def _gemma3_check(config) -> None:
    # llama.cpp fixes these (hparams.set_swa_pattern(6), rope_freq_base_train_swa = 10000).
    for index, kind in enumerate(getattr(config, "layer_types", None) or []):
        expected = "sliding_attention" if index % 6 < 5 else "full_attention"
        if kind != expected:
            raise UnsupportedForGGUF(f"gemma3 layer {index} is {kind!r}; llama.cpp makes every 6th layer "
                                     f"global, so it would run it as {expected!r}")
    local = rope_parameters(config, "sliding_attention")
    if float(local.get("rope_theta", 10000.0)) != 10000.0 or local.get("rope_type", "default") != "default":
        raise UnsupportedForGGUF(f"gemma3 sliding-layer RoPE {local} differs from llama.cpp's fixed base 10000")
    # llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 62-layer 27B.
    expected = (config.hidden_size // config.num_attention_heads if config.num_hidden_layers == 62
                else head_dim(config))
    if config.query_pre_attn_scalar != expected:
        raise UnsupportedForGGUF(f"gemma3 query_pre_attn_scalar={config.query_pre_attn_scalar}, but llama.cpp "
                                 f"scales queries by 1/sqrt({expected})")
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, field, None) is not None:
            raise UnsupportedForGGUF(f"gemma3 with {field}={getattr(config, field)}: llama.cpp's gemma3 has none")
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedForGGUF("gemma3 with bidirectional attention (an embedding model) is not a causal LM")


ARCHES: tuple[GGUFArch, ...] = (
    GGUFArch("llama", ("llama",), permute_qk=True, check=_llama_check),
    GGUFArch("qwen2", ("qwen2",), check=_qwen2_check),
    GGUFArch("gemma3", ("gemma3_text",), norm_offset=1.0, metadata=_gemma3_metadata,
             check=_gemma3_check),
)


def arch_for(config) -> GGUFArch:
    for arch in ARCHES:
        if config.model_type in arch.model_types:
            return arch
    known = ", ".join(t for arch in ARCHES for t in arch.model_types)
    raise UnsupportedForGGUF(f"no GGUF export for model_type {config.model_type!r} yet (supported: {known})")


def write_metadata(writer, arch: GGUFArch, config) -> None:
    """All architecture keys llama.cpp reads for `arch` (general.* and tokenizer.* are elsewhere)."""
    if arch.check is not None:
        arch.check(config)
    layer_type = "full_attention" if arch.name == "gemma3" else None
    _common(writer, config, arch, rope_parameters(config, layer_type))
    if arch.metadata is not None:
        arch.metadata(writer, config)
