"""Model shapes for GPU benchmarks, random-initialised from their published configs.

No weights can be downloaded on the GPU machine; a random model of the same shape times exactly
like the real one (same matmul sizes, same NF4 storage). `make_shape` saves one as bf16
safetensors so every stack loads the same bytes through its own loader.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

SHAPES = {
    "llama-3.2-1b": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
        max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192),
    ),
    "llama-3.1-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
        max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192),
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_parameters=dict(rope_type="default", rope_theta=1e6),
    ),
    "gemma-2-9b": dict(
        model_type="gemma2", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=256000,
        max_position_embeddings=8192, rms_norm_eps=1e-6, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, sliding_window=4096, query_pre_attn_scalar=256,
        hidden_activation="gelu_pytorch_tanh",
    ),
}


def shape_config(name: str):
    from transformers import AutoConfig

    values = dict(SHAPES[name])
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


def write_placeholder_tokenizer(folder: Path, config) -> None:
    """A word-level tokenizer over the shape's vocabulary ("t0" .. "tN"), with BOS/EOS/PAD at the
    config's ids. Benchmarks feed random token ids and never tokenize; Unsloth's loader insists on
    loading a tokenizer from the folder, and the real ones cannot be downloaded on the device."""
    if (folder / "tokenizer.json").is_file():
        return
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()

    def token(value, fallback: int) -> str:
        value = value[0] if isinstance(value, list) else value
        return f"t{fallback if value is None else value}"

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=token(config.bos_token_id, 1), eos_token=token(config.eos_token_id, 2),
        pad_token=token(getattr(config, "pad_token_id", None), config.vocab_size - 1), unk_token="t0")
    wrapped.save_pretrained(folder)


def make_shape(name: str, folder: Path) -> Path:
    """Random-initialise shape `name` on the GPU in bf16 and save it (skipped if already there)."""
    import torch
    from transformers import AutoModelForCausalLM

    if (folder / "config.json").is_file():
        write_placeholder_tokenizer(folder, shape_config(name))
        return folder
    start = time.perf_counter()
    config = shape_config(name)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="5GB")
    del model
    write_placeholder_tokenizer(folder, config)
    print(f"made {name} in {folder} in {time.perf_counter() - start:.0f} s", flush=True)
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    make_shape(args.shape, args.folder)
