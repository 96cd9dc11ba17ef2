"""Tiny random models built from configs: hidden 64, 2 layers, a small vocabulary.

Each family's differences (norm variant, activation, soft-capping, ...) come from the family
table in `tuneforge.models.families`; this module only shrinks the dimensions.
"""

import torch

# Odd on purpose where the kernels care: vocab not a power of two, intermediate not a multiple of 64.
TINY_DIMENSIONS = dict(
    vocab_size=317,
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def tiny_config(family: str = "llama", **overrides):
    """A transformers config of `family` shrunk to TINY_DIMENSIONS (plus `overrides`)."""
    from tuneforge.models.families import get_family

    spec = get_family(family)
    values = dict(TINY_DIMENSIONS)
    values.update(spec.tiny_config_overrides)
    values.update(overrides)
    return spec.new_config(**values)


# Where tests that run on either machine put tiny models: the GPU when there is one (the kernels
# then run compiled), else the CPU (the kernels then run under TRITON_INTERPRET=1).
TEST_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny_model(family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu", **overrides):
    """A randomly initialised causal LM of `family` on `device`, deterministic for a given seed."""
    from transformers import AutoModelForCausalLM

    from tuneforge.models.families import get_family

    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    attn = get_family(family).attn_implementation
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model.to(device).eval()


def tiny_batch(batch: int = 2, seq: int = 8, seed: int = 1, vocab: int = TINY_DIMENSIONS["vocab_size"],
               prompt: int = 2, pad: int = 2, device="cpu"):
    """(input_ids, attention_mask, labels), each [batch, seq], for tests of tiny models.

    Token ids avoid 0-2 (pad/bos/eos in the tiny configs). Labels mask the first `prompt` tokens
    of every row (a prompt) and, on the last row, `pad` right-padding positions, which the
    attention mask also hides.
    """
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch, seq), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[:, :prompt] = -100
    if pad:
        attention_mask[-1, seq - pad:] = 0
        labels[-1, seq - pad:] = -100
        input_ids[-1, seq - pad:] = 0
    return input_ids.to(device), attention_mask.to(device), labels.to(device)


def loss_one_by_one(model, features) -> torch.Tensor:
    """The reference for a packed row's loss: each sample ({input_ids, labels} lists) run alone, and
    the token-weighted mean of their losses (fp64), which is what the packed row's mean over all
    its trained tokens must equal."""
    total, count = 0.0, 0
    for feature in features:
        ids = torch.tensor([feature["input_ids"]])
        labels = torch.tensor([feature["labels"]])
        n = int((labels[0, 1:] != -100).sum())
        total = total + model(input_ids=ids, labels=labels).loss.double() * n
        count += n
    return total / count


def randomize_lora_b(model, seed: int = 7, std: float = 0.02) -> None:
    """Give every lora_B weight random values (deterministic by name order).

    peft starts B at zero, which makes every lora_A gradient zero: a gradient comparison on a
    fresh adapter could not see a wrong dA.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def lora_grads(model) -> dict:
    """{parameter name without peft's prefix: gradient} of the trainable (LoRA) parameters."""
    return {
        name.replace("base_model.model.", ""): parameter.grad.detach().clone()
        for name, parameter in model.named_parameters() if parameter.requires_grad
    }


def record_rope_calls(monkeypatch) -> list:
    """Spy on kernels.rope.apply_rope: returns a list that fills with (inplace asked, q and k
    returned as the very tensors passed) for every call made while the monkeypatch holds."""
    import tuneforge.kernels.rope as rope

    calls, apply_rope = [], rope.apply_rope

    def spy(q, k, cos, sin, head_dim, inplace=True):
        out = apply_rope(q, k, cos, sin, head_dim, inplace=inplace)
        calls.append((inplace, out[0] is q and out[1] is k))
        return out

    monkeypatch.setattr(rope, "apply_rope", spy)
    return calls


def nf4_round_trip_experts(model, family: str) -> int:
    """Replace each stacked expert weight of `model` (a MoE family's `experts`) by its NF4 round trip
    through bitsandbytes' own quantize_4bit / dequantize_4bit (double-quantised, blocks of 64), so
    that transformers' own experts module computes the reference for tuneforge's NF4 experts.

    The stack is dequantised as [-1, 64] rows: bitsandbytes' CPU dequantize_4bit (0.50.2) is wrong
    for a last dimension that is not a multiple of the blocksize (a [E, 64, 48] stack comes back up
    to 4x off), and any view of the same flattened values has the same codes and block scales.
    Returns how many weights were replaced.
    """
    import bitsandbytes.functional as bnbf

    from tuneforge.models.families import get_family
    from tuneforge.models.moe import experts_modules

    spec, count = get_family(family), 0
    with torch.no_grad():
        for _, experts in experts_modules(model, spec):
            for name in spec.experts:
                weight = getattr(experts, name)
                packed, state = bnbf.quantize_4bit(weight.detach().reshape(-1, 64).contiguous(), blocksize=64,
                                                   compress_statistics=True, quant_type="nf4")
                weight.copy_(bnbf.dequantize_4bit(packed, state).reshape(weight.shape))
                count += 1
    return count
