"""A saved LoRA adapter, read back as per-weight deltas: the input of every merged export.

peft writes an adapter folder as `adapter_config.json` + `adapter_model.safetensors` whose keys
look like `base_model.model.<module>.lora_A.weight` ([r, in]) and `...lora_B.weight` ([out, r]).
This module turns that into `{base weight name: LoraDelta}` keyed the way the *base*
checkpoint names its tensors (`model.layers.0.self_attn.q_proj.weight`), so a merge can walk
the base shards and look each tensor up. Keys that are neither A nor B (modules_to_save copies,
trained biases) are full replacement tensors for the base tensor of the same name.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tuneforge.atomic import file_problem

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
# peft's saved-key suffixes: (kind, A suffix, B suffix).
_LORA_SUFFIXES = (
    ("linear", ".lora_A.weight", ".lora_B.weight"),
    ("embedding", ".lora_embedding_A", ".lora_embedding_B"),
)
# Tokenizer files copied alongside every export, when the source folder has them.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


@dataclass(frozen=True)
class LoraDelta:
    """One adapted weight: `W' = W + scale * B @ A` (transposed back for embeddings / fan_in_fan_out).

    a: [r, in] for a Linear; [r, num_embeddings] for an Embedding (peft's lora_embedding_A).
    b: [out, r] for a Linear; [embedding_dim, r] for an Embedding.
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    kind: str = "linear"
    fan_in_fan_out: bool = False
    # kind "experts": peft's ParamWrapper on a stacked [E, out, in] (or, `transposed`, [E, in, out])
    # MoE weight: a [r*E, in] expert-major, b [out, r*E] expert-minor, as peft's get_delta_weight reads them.
    experts: int = 0
    transposed: bool = False

    def delta(self) -> torch.Tensor:
        """The fp32 update in the base weight's layout: [out, in] (Linear), [num, dim] (Embedding),
        [E, out, in] or [E, in, out] (stacked experts)."""
        if self.kind == "experts":
            a = self.a.float().reshape(self.experts, -1, self.a.shape[-1])
            b = self.b.float().reshape(self.b.shape[0], -1, self.experts)
            return torch.einsum("ore,eri->eio" if self.transposed else "ore,eri->eoi", b, a) * self.scale
        update = (self.b.float() @ self.a.float()) * self.scale
        # An Embedding's weight is [num_embeddings, dim] while B @ A is [dim, num_embeddings];
        # a Conv1D-style (fan_in_fan_out) weight is stored [in, out].
        if self.kind == "embedding" or self.fan_in_fan_out:
            update = update.T
        return update

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """weight (any float dtype, base layout) -> fp32 merged weight, rounded once by the caller."""
        if weight.shape != self.delta_shape:
            raise ValueError(f"LoRA delta of shape {tuple(self.delta_shape)} does not fit base weight "
                             f"of shape {tuple(weight.shape)}")
        return weight.float() + self.delta()

    @property
    def delta_shape(self) -> torch.Size:
        if self.kind == "experts":
            out, inp = self.b.shape[0], self.a.shape[1]
            return torch.Size((self.experts, inp, out) if self.transposed else (self.experts, out, inp))
        shape = torch.Size((self.b.shape[0], self.a.shape[1]))
        return torch.Size(reversed(shape)) if (self.kind == "embedding" or self.fan_in_fan_out) else shape


@dataclass
class LoraAdapter:
    """The deltas and replacement tensors of one adapter, keyed by base tensor name."""

    base_model: str | None
    deltas: dict[str, LoraDelta] = field(default_factory=dict)
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)
    source: Path | None = None
    target_parameters: list[str] = field(default_factory=list)  # peft's, from adapter_config.json

    @classmethod
    def load(cls, folder: str | Path) -> "LoraAdapter":
        folder = Path(folder)
        config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
        if not config_path.is_file():
            raise FileNotFoundError(f"{folder} is not a LoRA adapter folder: {ADAPTER_CONFIG} is missing")
        if not weights_path.is_file():
            legacy = folder / "adapter_model.bin"
            hint = " (a legacy .bin adapter: re-save it with safetensors)" if legacy.exists() else ""
            raise FileNotFoundError(f"{weights_path} is missing{hint}")
        config = json.loads(config_path.read_text())
        peft_type = config.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise NotImplementedError(f"{config_path}: peft_type {peft_type!r} cannot be merged; only LORA")
        if config.get("use_dora"):
            raise NotImplementedError(f"{config_path}: DoRA adapters (use_dora=true) cannot be merged yet")
        from safetensors.torch import load_file

        adapter = cls.from_state_dict(load_file(str(weights_path)), config, where=str(weights_path))
        adapter.source = folder
        return adapter

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], config: dict, where: str = "adapter") -> "LoraAdapter":
        """state: peft's saved keys (`base_model.model.<module>.lora_A.weight`, ...)."""
        adapter = cls(base_model=config.get("base_model_name_or_path"))
        adapter.target_parameters = list(config.get("target_parameters") or [])
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
            if "lora_magnitude_vector" in name:
                raise NotImplementedError(f"{where}: {key} is a DoRA magnitude; DoRA cannot be merged yet")
            for kind, a_suffix, b_suffix in _LORA_SUFFIXES:
                for part, suffix in (("a", a_suffix), ("b", b_suffix)):
                    if name.endswith(suffix):
                        module = name[: -len(suffix)]
                        pairs.setdefault(module, {"kind": kind})[part] = tensor
                        break
                else:
                    continue
                break
            else:
                # modules_to_save copies, trained biases and saved (resized) embedding layers
                # replace the base tensor outright; any delta still applies on top.
                adapter.replacements[name.replace(".base_layer.", ".")] = tensor
        for module, parts in pairs.items():
            if "a" not in parts or "b" not in parts:
                raise ValueError(f"{where}: {module} has only one of lora_A / lora_B")
            kind = parts["kind"]
            rank = parts["a"].shape[0]
            alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
            scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
            weight_name = module + ".weight"
            adapter.deltas[weight_name] = LoraDelta(
                a=parts["a"], b=parts["b"], scale=float(scale), kind=kind,
                fan_in_fan_out=bool(config.get("fan_in_fan_out")) and kind == "linear",
            )
        return adapter

    @classmethod
    def from_peft_model(cls, model, adapter_name: str = "default") -> "LoraAdapter":
        """The deltas of an in-memory peft model, read from its LoRA layers (scaling included)."""
        from peft.tuners.lora import LoraLayer

        adapter = cls(base_model=getattr(model, "name_or_path", None))
        for name, module in model.named_modules():
            if not isinstance(module, LoraLayer) or adapter_name not in module.scaling:
                continue
            if getattr(module, "use_dora", {}).get(adapter_name):
                raise NotImplementedError(f"{name}: DoRA adapters cannot be merged yet")
            parameter = getattr(module, "parameter_name", None)  # peft's ParamWrapper (target_parameters)
            base_name = strip_peft_prefix(name) + "." + (parameter or "weight")
            if parameter is not None and module.num_experts > 1:
                adapter.deltas[base_name] = LoraDelta(
                    a=module.lora_A[adapter_name].weight.detach(), b=module.lora_B[adapter_name].weight.detach(),
                    scale=float(module.scaling[adapter_name]), kind="experts", experts=module.num_experts,
                    transposed=not module._did_swap_in_out_features)
                continue
            if adapter_name in getattr(module, "lora_A", {}):
                a = module.lora_A[adapter_name].weight.detach()
                b = module.lora_B[adapter_name].weight.detach()
                kind = "linear"
            else:
                a = module.lora_embedding_A[adapter_name].detach()
                b = module.lora_embedding_B[adapter_name].detach()
                kind = "embedding"
            adapter.deltas[base_name] = LoraDelta(
                a=a, b=b, scale=float(module.scaling[adapter_name]), kind=kind,
                fan_in_fan_out=bool(getattr(module, "fan_in_fan_out", False)) and kind == "linear",
            )
        return adapter

    def check_fits(self, base_names: set[str]) -> None:
        """Every delta and replacement must land on a base tensor; a stray key is an error."""
        if self.target_parameters:
            # peft nests one ParamWrapper per targeted parameter and saves them by nesting depth
            # (`experts.lora_A`, `experts.base_layer.lora_A`), which only the built model resolves.
            raise NotImplementedError(
                f"{self.source or 'adapter'}: LoRA on parameters (target_parameters={self.target_parameters}, "
                "e.g. MoE experts) is merged from the model, not from the adapter files: load it with "
                "FastLanguageModel.from_pretrained(<adapter folder>) and call save_pretrained_merged")
        missing = sorted(name for name in {*self.deltas, *self.replacements} if name not in base_names)
        if missing:
            where = self.source or "adapter"
            raise ValueError(f"{where}: {len(missing)} adapter tensor(s) match no base tensor, e.g. "
                             f"{missing[:3]}; is base_model_name_or_path the model it was trained on?")


def strip_peft_prefix(name: str) -> str:
    """`base_model.model.model.layers.0.q_proj.base_layer` -> `model.layers.0.q_proj`."""
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX):]
    return name.replace(".base_layer", "")


def _pattern_value(patterns: dict, module: str, default):
    # peft matches alpha/rank patterns against the end of the module's dotted name.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?{pattern}$", module):
            return value
    return default


def copy_tokenizer_files(source: Path, destination: Path) -> list[str]:
    """Copy the tokenizer files that exist in `source`; returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, destination / name)
            copied.append(name)
    return copied


def save_adapter(model, save_directory: str | Path, tokenizer=None) -> Path:
    """The `save_method="lora"` export: peft's own adapter files (+ the tokenizer)."""
    save_directory = Path(save_directory)
    if not hasattr(model, "peft_config"):
        raise TypeError("save_method='lora' needs a peft model (the one get_peft_model returned)")
    from tuneforge.integration.bnb import standard_layout

    # Before peft's state_dict(): bitsandbytes' own unpacking there re-quantises the block scales.
    standard_layout(model)
    model.save_pretrained(str(save_directory))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(save_directory))
    log.info("saved the LoRA adapter to %s", save_directory)
    return save_directory


def adapter_folder(path: str | Path) -> Path:
    """The folder holding adapter_config.json: `path` itself or its `adapter/` (a train run)."""
    path = Path(path)
    for candidate in (path, path / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise FileNotFoundError(f"--adapter {path}: no adapter_config.json there or in {path / 'adapter'}")


def load_tokenizer(adapter_dir: Path, base_dir: Path):
    """The adapter folder's tokenizer when it has one (chat template, added tokens), else the base's."""
    from transformers import AutoTokenizer

    source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    return AutoTokenizer.from_pretrained(str(source))


def adapter_problem(folder: Path) -> str | None:
    """What makes adapter `folder` unusable (a truncated or unreadable config or weights file), or None."""
    config = folder / "adapter_config.json"
    try:
        json.loads(config.read_text())
    except (OSError, ValueError) as error:
        return f"{config} cannot be read ({type(error).__name__}); the adapter is damaged"
    weights = [folder / name for name in ("adapter_model.safetensors", "adapter_model.bin") if (folder / name).is_file()]
    if not weights:
        return f"{folder} has adapter_config.json but no adapter_model.safetensors"
    problem = file_problem(weights[0])
    if problem:
        return (f"{folder}: {problem}; the adapter is damaged (a save cut off, a partial copy?): "
                "export it again from the run's newest checkpoint-N folder, or retrain")
    return None
