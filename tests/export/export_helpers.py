"""Helpers shared by the export tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import json
import math

import torch

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def perturb_lora(model, seed: int = 1, scale: float = 0.05) -> None:
    """peft initialises lora_B to zero (a no-op adapter); give A and B random values so merges show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def lora_model(base, seed: int = 1, scale: float = 0.05, **config):
    """base wrapped by peft LoRA (r=4 on all linear layers unless overridden), with non-zero B."""
    from peft import LoraConfig, get_peft_model

    settings = dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR, lora_dropout=0.0)
    settings.update(config)
    model = get_peft_model(base, LoraConfig(**settings))
    perturb_lora(model, seed, scale)
    return model.eval()


def llama_cpp_quiet(path, **kwargs):
    """A llama-cpp-python model on `path` without its load log.

    One thread: ggml's workers spin while waiting, so on a shared 2-core machine (or beside pytest-xdist
    workers) two threads run several times slower than one.
    """
    from llama_cpp import Llama

    return Llama(model_path=str(path), verbose=False, n_threads=1, **kwargs)


def set_base(adapter_dir, base_dir) -> None:
    """Point a saved adapter at its base folder (peft records the in-memory model's name, or None)."""
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = str(base_dir)
    path.write_text(json.dumps(config))


def spread_weights(model, seed: int = 0, fp16_exact: bool = False):
    """Weights of unit-scale activations: attention far from uniform, so a Q/K layout error shows.

    fp16_exact: round every weight to the nearest float16 (kept in fp32), so that an F16 GGUF holds
    exactly the weights transformers runs and a comparison measures the export, not the rounding.
    """
    generator = torch.Generator().manual_seed(seed)
    offset = 0.0 if model.config.model_type.startswith("gemma") else 1.0  # Gemma's norm is 1 + w
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_norm = any(part in name for part in ("norm", "ln_"))
            if "embed" in name:
                param.copy_(noise * 0.5)
            elif param.ndim >= 2 and not is_norm:  # [out, in], or a MoE's stacked [experts, out, in]
                param.copy_(noise / math.sqrt(param.shape[-1]))
            elif is_norm and name.endswith("weight"):
                param.copy_(offset + 0.2 * noise)
            else:
                param.copy_(0.1 * noise)
            if fp16_exact:
                param.copy_(param.half().float())
    return model.eval()
