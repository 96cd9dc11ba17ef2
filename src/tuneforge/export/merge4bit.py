"""Merged 4-bit export: the merged model stored as bitsandbytes NF4, the way transformers saves one.

Each Linear weight is merged (fp32), rounded once to the 16-bit compute dtype (what a merged
16-bit checkpoint would hold), then quantised by bitsandbytes itself (`quantize_4bit`, NF4,
blocksize 64, double-quantised absmax) and stored as transformers stores a `Params4bit`: the
packed bytes under the weight's name plus its quant-state tensors. `config.json` carries the
matching `quantization_config`, so `AutoModelForCausalLM.from_pretrained` reloads it as 4-bit.
Streamed like the 16-bit merge: one tensor in flight, shards written as they fill.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from tuneforge.export.merge import (
    DEFAULT_MAX_SHARD_SIZE, ShardWriter, output_config, parse_size, peak_rss_bytes,
)

log = logging.getLogger(__name__)

BLOCKSIZE = 64
# transformers keeps the output layer in 16-bit when it quantises a causal LM; so do we.
SKIP_MODULES = ("lm_head",)


def linear_weight_names(config: dict) -> set[str]:
    """Names of the nn.Linear weights of the model `config` describes (built on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(config)
    model_type = kwargs.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return {f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.split(".")[-1] not in SKIP_MODULES}


def quantization_config(compute_dtype: torch.dtype) -> dict:
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": list(SKIP_MODULES),
    }


def write_merged_4bit(source, save_directory: str | Path, dtype: torch.dtype,
                      max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, progress: bool = True) -> Path:
    """Stream `source` into an NF4 checkpoint; `dtype` is the 16-bit compute / storage dtype."""
    import bitsandbytes.functional as bnbf
    from tqdm.auto import tqdm

    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    linear = linear_weight_names(source.config)
    writer = ShardWriter(out, parse_size(max_shard_size))
    quantised = 0
    infos = source.infos
    for name, tensor in tqdm(source.tensors(), total=len(infos), desc="merging to 4-bit", disable=not progress,
                             unit="tensor"):
        if not tensor.is_floating_point():
            writer.add(name, tensor)
            continue
        tensor = tensor.to(dtype)
        if name not in linear:
            writer.add(name, tensor)
            continue
        packed, state = bnbf.quantize_4bit(tensor, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
        writer.add(name, packed)
        for key, value in state.as_dict(packed=True).items():
            writer.add(f"{name}.{key}", value)
        quantised += 1
    shards = writer.close()
    config = output_config(source.config, dtype)
    config["quantization_config"] = quantization_config(dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    log.info("merged into NF4: %d linear weights quantised, %.1f MB in %d shard(s) in %s; peak RSS %.0f MB",
             quantised, writer.total_bytes / 1e6, len(shards), out, peak_rss_bytes() / 1e6)
    return out
