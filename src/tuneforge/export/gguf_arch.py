"""What llama.cpp expects of each architecture, as data: metadata, tensor layout, unsupported configs.

The family table (`tuneforge.models.families`) holds every per-family fact: which llama.cpp
architecture a family exports to (`gguf_arch`) and how its norms compute (`norm`). This module
holds one `GGUFArch` per llama.cpp architecture saying what that architecture needs; `arch_for`
joins the two. The GGUF writer asks the joined row; it never branches on a family or
architecture name.

The facts come from llama.cpp itself, the copy vendored in llama-cpp-python 0.3.36 (the runtime
the tests load every exported file with): its converter (`conversion/<family>.py`, called by
`convert_hf_to_gguf.py`), its loader (`src/models/<arch>.cpp`: which keys and tensors it reads,
which are optional) and `llama_model_rope_type`:

- RoPE: llama, granite and command-r use "normal" RoPE (pairs (2i, 2i+1)); every other
  architecture here uses NeoX RoPE (pairs (i, i + d/2)) as transformers does. Llama and Granite
  checkpoints are laid out for rotate-half, so their q_proj / k_proj rows are permuted per head
  (`permute_rotary`); Cohere's HF RoPE is itself interleaved, so its rows stay as they are.
- Gemma, Gemma 2, Gemma 3: the RMSNorm weight is applied as `1 + w`; llama.cpp applies it as
  stored, so the exporter writes `w + 1`. llama.cpp scales the token embeddings by sqrt(hidden)
  itself. Queries are scaled by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 27B models).
- Gemma 2: attention and final-logit soft-capping (keys `attn_logit_softcapping`,
  `final_logit_softcapping`); Gemma 2 / 3 and OLMo 2: sliding-window layers given per layer
  (`attention.sliding_window_pattern`, an array of bools) with their own RoPE base.
- Architectures without sliding windows in llama.cpp (llama for Mistral, starcoder2, qwen2/3,
  phi3 — whose loader switches SWA off): a model whose layers are windowed is exported with its
  context length capped at the window, inside which full attention and windowed attention agree.
- Phi-3: fused `attn_qkv` ([q; k; v] rows as in HF) and `ffn_up` holding [gate; up] (llama.cpp's
  SwiGLU takes the first half as the gate); partial rotary via `rope.dimension_count`.
- Falcon: the fused query_key_value is grouped per KV head in HF ([q.., k, v] per group); llama.cpp
  wants all q rows, then all k, then all v. New-architecture Falcon's `ln_attn` feeds attention
  (`attn_norm_2`), `ln_mlp` the MLP (`attn_norm`). No biases, no ALiBi, always parallel attention.
- StableLM: LayerNorm with bias, partial rotary, optional q/k/v biases, optional parallel residual
  (no `ffn_norm`), optional per-head q/k LayerNorms that llama.cpp wants stacked into one tensor.
- StarCoder 2: LayerNorm with bias, biases on every projection (required by llama.cpp), GELU MLP.
- Command-R (Cohere): LayerNorm without bias, parallel attention and MLP, logits times
  `logit_scale`, output always tied to the embeddings, optional per-head q/k LayerNorms.
- Granite: the llama graph plus `attention.scale`, `embedding_scale`, `residual_scale` and
  `logit_scale` (llama.cpp divides the logits by it); head_dim is not read.
- OLMo 2: post-norms only (`post_attention_norm`, `post_ffw_norm`), RMSNorm over all q / k heads
  at once (`attn_q_norm` of size hidden); llama.cpp requires a separate output tensor.
- Mixture of experts (Mixtral as `llama`, Qwen3-MoE as `qwen3moe`, gpt-oss): the router is
  `ffn_gate_inp` [experts, hidden] (kept F32, as llama.cpp's converter and quantiser keep it: a
  routing decision flips on a small rounding), and the experts three stacked tensors: transformers
  5's `gate_up_proj` [experts, 2 * ff, hidden] is cut into `ffn_gate_exps` (first half of the rows)
  and `ffn_up_exps`, `down_proj` [experts, hidden, ff] is `ffn_down_exps` as it is. Mixtral's and
  Qwen3-MoE's graphs take a softmax over all experts, the top `expert_used_count` and renormalise their weights always
  (Mixtral does; Qwen3-MoE only with norm_topk_prob); every qwen3moe layer is sparse, and its
  expert width is `expert_feed_forward_length`.
- gpt-oss: experts stored transposed ([experts, in, out]) with biases, gate and up interleaved by
  column (even / odd), so the exporter transposes and de-interleaves them; per-head attention sinks
  (`attn_sinks`), biases on q/k/v/o and the router, `post_attention_norm` before the experts, the
  router's softmax over the chosen experts only, and SwiGLU clamped at 7.0 with alpha 1.702 (both
  hard-coded in llama.cpp). Layers alternate sliding-window and full attention from a sliding
  first layer. YaRN RoPE: llama.cpp rounds the correction range to whole dimensions, which
  transformers' gpt-oss (truncate=false) keeps fractional; a few slow frequencies then differ and
  logits drift apart with position (every gpt-oss GGUF runs so; the exporter warns).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from tuneforge.models.families import head_dim

log = logging.getLogger(__name__)


class UnsupportedForGGUF(ValueError):
    """The model's config asks for something llama.cpp's architecture cannot represent."""


@dataclass(frozen=True)
class GGUFArch:
    """One llama.cpp architecture, as the exporter needs to know it.

    name:           llama.cpp's architecture name (`general.architecture`).
    norm:           the exported family's `FamilySpec.norm`, filled in by `arch_for` (a row of
                    ARCHES leaves it at "rms"): it gives `norm_offset` and `layer_norm`.
    permute_qk:     llama.cpp rotates interleaved pairs but the HF rows are rotate-half: permute
                    q_proj / k_proj rows per head.
    sliding_window: llama.cpp runs per-layer sliding windows for this architecture.
    output:         the output (lm_head) tensor: "optional" (absent means tied), "tied" (llama.cpp
                    always uses the embeddings) or "required" (a tied model writes it twice).
    head_dim_keys:  write `attention.key_length` / `value_length` from config.head_dim.
    activations:    the MLP activations (HF names) llama.cpp's graph computes for this architecture.
    stacked:        (regex over HF names with one group per head index, HF name of the stack):
                    per-head tensors llama.cpp reads as one [heads, ...] tensor.
    split:          (regex over HF names, ((name of a part, tensor -> part), ...))): one HF tensor
                    llama.cpp reads as several (or, with one part, renamed and laid out anew).
    experts:        llama.cpp runs mixture-of-experts layers for this architecture.
    rope_scalings:  RoPE scaling types (`rope_type`) exported beyond "default" and "linear": "llama3"
                    (the rope_freqs tensor), "longrope" (rope_factors_long / _short), "yarn".
    kv_heads:       config -> the KV head count, where `num_key_value_heads` is not it (Falcon 7B).
    transforms:     {GGUF name suffix: (tensor [out, in], config) -> tensor} for layouts that differ.
    metadata:       writes the architecture's own keys: (writer, config) -> None.
    check:          raises UnsupportedForGGUF for configs llama.cpp cannot run as HF does.
    """

    name: str
    norm: str = "rms"
    permute_qk: bool = False
    sliding_window: bool = False
    output: str = "optional"
    head_dim_keys: bool = True
    activations: tuple[str, ...] = ("silu",)
    stacked: tuple[tuple[str, str], ...] = ()
    split: tuple[tuple[str, tuple[tuple[str, Callable], ...]], ...] = ()
    experts: bool = False
    rope_scalings: tuple[str, ...] = ()
    transforms: dict[str, Callable] = field(default_factory=dict)
    kv_heads: Callable | None = None
    metadata: Callable | None = None
    check: Callable | None = None

    @property
    def norm_offset(self) -> float:
        """Added to every `*norm.weight`: Gemma's RMSNorm computes x_hat * (1 + w), llama.cpp x_hat * w."""
        return 1.0 if self.norm == "rms_offset" else 0.0

    @property
    def layer_norm(self) -> bool:
        """The norms are LayerNorms (eps under `attention.layer_norm_epsilon`), not RMSNorms."""
        return self.norm == "layer"

    def transform(self, gguf_name: str, tensor: torch.Tensor, config) -> torch.Tensor:
        """tensor: the HF tensor (fp32) -> the tensor llama.cpp expects under `gguf_name`."""
        if self.permute_qk and gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
            tensor = permute_rotary(tensor, config.num_attention_heads)
        elif self.permute_qk and gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
            tensor = permute_rotary(tensor, config.num_key_value_heads)
        for suffix, function in self.transforms.items():
            if gguf_name.endswith(suffix):
                tensor = function(tensor, config)
        if self.norm_offset and gguf_name.endswith("norm.weight"):
            tensor = tensor + self.norm_offset
        return tensor


def permute_rotary(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """weight: [n_head * d_head, ...] rotate-half rows -> interleaved-pair rows (same shape).

    HF keeps a head's rotary pairs as (i, i + d_head/2); llama.cpp's normal RoPE pairs (2i, 2i+1).
    """
    shape = weight.shape
    return weight.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def rope_parameters(config, layer_type: str | None = None) -> dict:
    """transformers 5 keeps RoPE settings in `rope_parameters`, per layer type for Gemma 3."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if layer_type is not None and layer_type in params:
        params = dict(params[layer_type])
    elif "full_attention" in params:
        params = dict(params["full_attention"])
    return params


def rotary_dims(config) -> int:
    """How many of a head's dimensions are rotated (Phi-3 / StableLM rotate a leading fraction)."""
    factor = rope_parameters(config).get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    return int(head_dim(config) * factor) if factor is not None else head_dim(config)


def windowed_layers(config) -> list[bool]:
    """Per layer: does the HF model attend through a sliding window there?"""
    layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if not window:
        return [False] * layers
    kinds = getattr(config, "layer_types", None)
    if kinds:
        return [kind == "sliding_attention" for kind in kinds]
    return [bool(getattr(config, "use_sliding_window", True))] * layers


def expert_count(config) -> int:
    """Experts per MoE layer; 0 for a dense model."""
    return next((count for name in ("num_local_experts", "num_experts")
                 if (count := getattr(config, name, None))), 0)


def _first(config, names: tuple[str, ...]):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    raise UnsupportedForGGUF(f"{config.model_type} config has none of {', '.join(names)}")


def _common(writer, config, arch: GGUFArch) -> None:
    rope = rope_parameters(config)
    context = config.max_position_embeddings
    windowed = windowed_layers(config)
    if any(windowed) and arch.sliding_window:
        writer.add_sliding_window(config.sliding_window)
        writer.add_sliding_window_pattern(windowed)
        local = rope_parameters(config, "sliding_attention")
        if local != rope and local.get("rope_type", "default") != "default":
            raise UnsupportedForGGUF(f"{arch.name}: sliding-layer RoPE scaling {local['rope_type']!r} is not exported")
        writer.add_rope_freq_base_swa(float(local.get("rope_theta", rope.get("rope_theta", 10000.0))))
    elif any(windowed) and config.sliding_window < context:
        # llama.cpp runs these layers with full attention: within the window the two agree.
        log.warning("%s: llama.cpp has no sliding window for this architecture; the GGUF's context length is "
                    "capped at the model's window (%d tokens, not %d), inside which both attend alike",
                    arch.name, config.sliding_window, context)
        context = config.sliding_window
    writer.add_context_length(context)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(arch.kv_heads(config) if arch.kv_heads else config.num_key_value_heads)
    if arch.layer_norm:
        writer.add_layer_norm_eps(_first(config, ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon")))
    else:
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_vocab_size(config.vocab_size)
    if expert_count(config):
        writer.add_expert_count(expert_count(config))
        writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_rope_dimension_count(rotary_dims(config))
    if arch.head_dim_keys and getattr(config, "head_dim", None):
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
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
    if kind not in arch.rope_scalings:
        supported = ", ".join(f"{scaling} for {row.name}" for row in ARCHES.values() for scaling in row.rope_scalings)
        raise UnsupportedForGGUF(f"RoPE scaling {kind!r} is not exported to GGUF for {arch.name} yet "
                                 f"(supported: default, linear, {supported})")
    if kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        writer.add_rope_scaling_yarn_beta_fast(float(rope.get("beta_fast", 32.0)))
        writer.add_rope_scaling_yarn_beta_slow(float(rope.get("beta_slow", 1.0)))
        if not rope.get("truncate", True):
            log.warning("%s: llama.cpp rounds YaRN's correction range to whole dimensions, where this model "
                        "(truncate=false) keeps it fractional; as in every %s GGUF (llama.cpp's converter "
                        "writes the same), a few slow rotary frequencies differ slightly and logits drift apart "
                        "with position", arch.name, arch.name)
        return
    if kind == "longrope":
        # The factors are the rope_factors_long / _short tensors (see extra_tensors).
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    # llama3: carried by the rope_freqs tensor (see extra_tensors).


def extra_tensors(arch: GGUFArch, config) -> dict[str, torch.Tensor]:
    """Tensors llama.cpp needs that the HF checkpoint does not store.

    Llama 3.1+ RoPE scaling: llama.cpp divides each rotary frequency by `rope_freqs[i]`, so the
    factors are (unscaled inverse frequency) / (llama3-scaled inverse frequency), both taken from
    transformers' own RoPE initialisers so the two runtimes rotate identically.

    Phi-3 LongRoPE: the config's long and short factors, one per rotary pair. transformers picks the
    long ones for a sequence longer than original_max_position_embeddings, llama.cpp for a context
    (n_ctx) longer than it: the two agree while Ollama's num_ctx stays within the original length.
    """
    rope = rope_parameters(config)
    scaling = rope.get("rope_type")
    if scaling not in arch.rope_scalings:
        return {}
    if scaling == "longrope":
        return {f"rope_factors_{kind}.weight": torch.tensor(rope[f"{kind}_factor"], dtype=torch.float32)
                for kind in ("long", "short")}
    if scaling != "llama3":
        return {}
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    dim = head_dim(config)
    theta = float(rope["rope_theta"])
    plain = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    return {"rope_freqs.weight": (plain / scaled.double()).float()}


# --- per-architecture facts ------------------------------------------------------------------


def _llama_check(config) -> None:
    if getattr(config, "mlp_bias", False):
        raise UnsupportedForGGUF("llama with mlp_bias=true has no llama.cpp tensor for the MLP biases")


def _gemma_query_scale(config, arch: str, big: int) -> None:
    # llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 27B models
    # (which llama.cpp tells by their `big` layer count).
    expected = (config.hidden_size // config.num_attention_heads if config.num_hidden_layers == big
                else head_dim(config))
    if config.query_pre_attn_scalar != expected:
        raise UnsupportedForGGUF(f"{arch} query_pre_attn_scalar={config.query_pre_attn_scalar}, but llama.cpp "
                                 f"scales queries by 1/sqrt({expected})")


def _gemma2_metadata(writer, config) -> None:
    if config.attn_logit_softcapping is not None:
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if config.final_logit_softcapping is not None:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)


def _gemma2_check(config) -> None:
    _gemma_query_scale(config, "gemma2", big=46)
    if config.attn_logit_softcapping is None:
        # llama.cpp's gemma2 always soft-caps the scores (its default cap is 50).
        raise UnsupportedForGGUF("gemma2 without attn_logit_softcapping: llama.cpp's gemma2 always soft-caps")


def _gemma3_metadata(writer, config) -> None:
    if getattr(config, "final_logit_softcapping", None) is not None:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)


def _gemma3_check(config) -> None:
    _gemma_query_scale(config, "gemma3", big=62)
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise UnsupportedForGGUF(f"gemma3 with attn_logit_softcapping={config.attn_logit_softcapping}: "
                                 "llama.cpp's gemma3 does not soft-cap attention scores")
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedForGGUF("gemma3 with bidirectional attention (an embedding model) is not a causal LM")


def _granite_metadata(writer, config) -> None:
    writer.add_attention_scale(config.attention_multiplier)
    writer.add_embedding_scale(config.embedding_multiplier)
    writer.add_residual_scale(config.residual_multiplier)
    writer.add_logit_scale(config.logits_scaling)


def _granite_check(config) -> None:
    if head_dim(config) != config.hidden_size // config.num_attention_heads:
        raise UnsupportedForGGUF("granite with head_dim != hidden_size / heads: llama.cpp's granite ignores head_dim")


def _command_r_check(config) -> None:
    # llama.cpp's command-r reads per-head q/k LayerNorms exactly when the model has 64+ layers
    # (Command R+), and requires them there.
    big = config.num_hidden_layers >= 64
    if bool(getattr(config, "use_qk_norm", False)) != big:
        raise UnsupportedForGGUF(f"cohere with use_qk_norm={getattr(config, 'use_qk_norm', False)} and "
                                 f"{config.num_hidden_layers} layers: llama.cpp's command-r has q/k norms "
                                 "exactly when there are 64 layers or more")


def _command_r_metadata(writer, config) -> None:
    import gguf

    writer.add_logit_scale(config.logit_scale)
    writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)


def _falcon_kv_heads(config) -> int:
    # transformers' FalconAttention: one KV head for the old multi-query layout (7B).
    if config.new_decoder_architecture or not config.multi_query:
        return config.num_kv_heads
    return 1


def _falcon_qkv(weight: torch.Tensor, config) -> torch.Tensor:
    """weight: [(n_head + 2 * n_kv) * d, hidden] grouped per KV head ([q.., k, v] per group)
    -> [all q; all k; all v] rows (llama.cpp's "jploski" layout)."""
    n_head, n_kv = config.num_attention_heads, _falcon_kv_heads(config)
    d = config.hidden_size // n_head
    groups = weight.reshape(n_kv, n_head // n_kv + 2, d, -1)
    q = groups[:, :-2].reshape(n_head * d, -1)
    k = groups[:, -2].reshape(n_kv * d, -1)
    v = groups[:, -1].reshape(n_kv * d, -1)
    return torch.cat((q, k, v)).reshape(weight.shape)


def _falcon_check(config) -> None:
    for flag, why in (("alibi", "ALiBi positions"), ("bias", "projection biases")):
        if getattr(config, flag, False):
            raise UnsupportedForGGUF(f"falcon with {flag}=true: llama.cpp's falcon has no {why}")
    if not config.parallel_attn:
        raise UnsupportedForGGUF("falcon with parallel_attn=false: llama.cpp's falcon always runs attention "
                                 "and MLP in parallel")


def _stablelm_metadata(writer, config) -> None:
    writer.add_parallel_residual(bool(config.use_parallel_residual))


def _starcoder2_check(config) -> None:
    if not config.use_bias:
        raise UnsupportedForGGUF("starcoder2 with use_bias=false: llama.cpp's starcoder2 requires the biases")


def _qwen3moe_metadata(writer, config) -> None:
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)


def _qwen3moe_check(config) -> None:
    if not config.norm_topk_prob:
        raise UnsupportedForGGUF("qwen3_moe with norm_topk_prob=false: llama.cpp's qwen3moe always renormalises "
                                 "the chosen experts' weights")
    dense = [layer for layer in range(config.num_hidden_layers) if layer in (config.mlp_only_layers or [])
             or (layer + 1) % config.decoder_sparse_step]
    if dense:
        raise UnsupportedForGGUF(f"qwen3_moe with dense MLP layers {dense} (mlp_only_layers / decoder_sparse_step): "
                                 "llama.cpp's qwen3moe runs experts in every layer")


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _first_half(tensor: torch.Tensor) -> torch.Tensor:
    """[experts, 2 * ff, hidden] -> the top half of the rows (the gate)."""
    return tensor.chunk(2, dim=-2)[0]


def _second_half(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.chunk(2, dim=-2)[1]


# transformers 5's stacked experts (Mixtral, Qwen3-MoE): gate_up_proj [E, 2 * ff, hidden] holds the
# gate's rows, then the up projection's; down_proj [E, hidden, ff] is llama.cpp's layout already.
STACKED_EXPERTS = (
    (r"(.*\.mlp\.experts)\.gate_up_proj$", ((r"\1.gate_proj.weight", _first_half),
                                            (r"\1.up_proj.weight", _second_half))),
    (r"(.*\.mlp\.experts)\.down_proj$", ((r"\1.down_proj.weight", _same),)),
)


def _gate_rows(tensor: torch.Tensor) -> torch.Tensor:
    """gpt-oss gate_up_proj [E, hidden, 2 * ff], gate and up interleaved -> the gate [E, ff, hidden]."""
    return tensor.transpose(-1, -2)[..., 0::2, :]


def _up_rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.transpose(-1, -2)[..., 1::2, :]


def _transposed(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.transpose(-1, -2)


def _even(tensor: torch.Tensor) -> torch.Tensor:
    return tensor[..., 0::2]


def _odd(tensor: torch.Tensor) -> torch.Tensor:
    return tensor[..., 1::2]


# gpt-oss: experts stored transposed ([E, in, out]) with biases, gate and up interleaved by column;
# the per-head attention sinks are a bare parameter.
GPT_OSS_TENSORS = (
    (r"(.*\.mlp\.experts)\.gate_up_proj$", ((r"\1.gate_proj.weight", _gate_rows), (r"\1.up_proj.weight", _up_rows))),
    (r"(.*\.mlp\.experts)\.gate_up_proj_bias$", ((r"\1.gate_proj.bias", _even), (r"\1.up_proj.bias", _odd))),
    (r"(.*\.mlp\.experts)\.down_proj$", ((r"\1.down_proj.weight", _transposed),)),
    (r"(.*\.mlp\.experts)\.down_proj_bias$", ((r"\1.down_proj.bias", _same),)),
    (r"(.*\.self_attn\.sinks)$", ((r"\1.weight", _same),)),
)


def _gpt_oss_metadata(writer, config) -> None:
    writer.add_expert_feed_forward_length(config.intermediate_size)


def _gpt_oss_check(config) -> None:
    # llama.cpp's gpt-oss hard-codes the clamped SwiGLU's constants and requires every bias.
    if (config.swiglu_alpha, config.swiglu_limit) != (1.702, 7.0):
        raise UnsupportedForGGUF(f"gpt_oss with swiglu_alpha={config.swiglu_alpha}, swiglu_limit="
                                 f"{config.swiglu_limit}: llama.cpp's gpt-oss computes 1.702 and 7.0")
    if not config.attention_bias:
        raise UnsupportedForGGUF("gpt_oss with attention_bias=false: llama.cpp's gpt-oss requires the biases")
    alternating = [layer % 2 == 0 for layer in range(config.num_hidden_layers)]
    if not config.sliding_window or windowed_layers(config) != alternating:
        raise UnsupportedForGGUF("gpt_oss whose layers do not alternate sliding-window and full attention from a "
                                 "sliding first layer: llama.cpp's gpt-oss runs that pattern")


def _phi3_metadata(writer, config) -> None:
    import math

    original = getattr(config, "original_max_position_embeddings", None)
    if original:
        writer.add_rope_scaling_orig_ctx_len(original)
    rope = rope_parameters(config)
    if rope.get("rope_type") == "longrope":
        # transformers' LongRoPE scales cos / sin by this attention factor; llama.cpp by attn_factor.
        scale = config.max_position_embeddings / original
        attention = rope.get("attention_factor") or (
            math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
        writer.add_rope_scaling_attn_factors(float(attention))


ARCHES: dict[str, GGUFArch] = {arch.name: arch for arch in (
    GGUFArch("llama", permute_qk=True, check=_llama_check, split=STACKED_EXPERTS, experts=True,
             rope_scalings=("llama3",)),
    GGUFArch("qwen2"),
    GGUFArch("qwen3"),
    GGUFArch("gpt-oss", sliding_window=True, output="required", split=GPT_OSS_TENSORS, experts=True,
             rope_scalings=("yarn",), metadata=_gpt_oss_metadata, check=_gpt_oss_check),
    GGUFArch("qwen3moe", split=STACKED_EXPERTS, experts=True, metadata=_qwen3moe_metadata, check=_qwen3moe_check),
    GGUFArch("phi3", rope_scalings=("longrope",), metadata=_phi3_metadata),
    GGUFArch("gemma", output="tied", activations=("gelu_pytorch_tanh", "gelu")),
    GGUFArch("gemma2", output="tied", sliding_window=True, activations=("gelu_pytorch_tanh",),
             metadata=_gemma2_metadata, check=_gemma2_check),
    GGUFArch("gemma3", sliding_window=True, activations=("gelu_pytorch_tanh",),
             metadata=_gemma3_metadata, check=_gemma3_check),
    GGUFArch("granite", permute_qk=True, head_dim_keys=False, metadata=_granite_metadata, check=_granite_check),
    GGUFArch("olmo2", sliding_window=True, output="required"),
    GGUFArch("command-r", output="tied", metadata=_command_r_metadata, check=_command_r_check),
    GGUFArch("falcon", activations=("gelu",), transforms={"attn_qkv.weight": _falcon_qkv},
             kv_heads=_falcon_kv_heads, check=_falcon_check),
    GGUFArch("stablelm", output="required", metadata=_stablelm_metadata,
             stacked=((r"(.*\.self_attn\.[qk]_layernorm)\.norms\.(\d+)\.weight$", r"\1.weight"),)),
    GGUFArch("starcoder2", activations=("gelu_pytorch_tanh",), check=_starcoder2_check),
)}


def arch_for(config) -> GGUFArch:
    """The llama.cpp architecture a model exports to (the family table's `gguf_arch`), joined with
    the family's `norm`."""
    from tuneforge.models.families import all_families, family_for_model_type

    family = family_for_model_type(config.model_type)
    if family is None or family.gguf_arch is None:
        known = ", ".join(t for spec in all_families().values() if spec.gguf_arch for t in spec.model_types)
        raise UnsupportedForGGUF(f"no GGUF export for model_type {config.model_type!r} (supported: {known})")
    return replace(ARCHES[family.gguf_arch], norm=family.norm)


def gguf_model_types() -> set[str]:
    """Every HF model_type with a GGUF architecture."""
    from tuneforge.models.families import all_families

    return {t for spec in all_families().values() if spec.gguf_arch in ARCHES for t in spec.model_types}


def stack_target(arch: GGUFArch, hf_name: str) -> tuple[str, int] | None:
    """(HF name of the stacked tensor, head index) when `hf_name` is one head of a stacked tensor."""
    for pattern, target in arch.stacked:
        match = re.match(pattern, hf_name)
        if match:
            return match.expand(target), int(match.group(2))
    return None


def split_parts(arch: GGUFArch, hf_name: str) -> list[tuple[str, Callable]] | None:
    """(name in llama.cpp's name map, tensor -> part) of each part `hf_name` is cut into."""
    for pattern, parts in arch.split:
        match = re.match(pattern, hf_name)
        if match:
            return [(match.expand(name), cut) for name, cut in parts]
    return None


def check_config(arch: GGUFArch, config) -> None:
    """Raises UnsupportedForGGUF where llama.cpp would run this config differently from transformers."""
    if expert_count(config) and not arch.experts:
        raise UnsupportedForGGUF(f"{arch.name} with {expert_count(config)} experts: llama.cpp's {arch.name} has no "
                                 "mixture-of-experts layers")
    activation = _first(config, ("hidden_activation", "hidden_act", "activation"))
    if activation not in arch.activations:
        raise UnsupportedForGGUF(f"{arch.name} with activation {activation!r}: llama.cpp's {arch.name} computes "
                                 f"{' / '.join(arch.activations)}")
    if arch.output == "tied" and not getattr(config, "tie_word_embeddings", True):
        raise UnsupportedForGGUF(f"{arch.name} with an untied lm_head: llama.cpp's {arch.name} always computes "
                                 "the logits with the token embeddings")
    if arch.check is not None:
        arch.check(config)


def write_metadata(writer, arch: GGUFArch, config) -> None:
    """All architecture keys llama.cpp reads for `arch` (general.* and tokenizer.* are elsewhere)."""
    check_config(arch, config)
    _common(writer, config, arch)
    if arch.metadata is not None:
        arch.metadata(writer, config)
