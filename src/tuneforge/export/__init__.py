"""Exports of a fine-tuned model, under Unsloth's names: adapter, merged 16/4-bit, GGUF (+ Ollama), Hub.

    model.save_pretrained_merged("out", tokenizer, save_method="lora" | "merged_16bit" | "merged_4bit")
    model.save_pretrained_gguf("out", tokenizer, quantization_method="f16" | "q8_0" | "q4_k_m" | [...])
    model.push_to_hub_merged("me/model", tokenizer, save_method=..., token=...)
    model.push_to_hub_gguf("me/model-gguf", tokenizer, quantization_method=..., token=...)

`attach_export_methods(model)` binds these four onto a model (the loader does it for the model
`get_peft_model` returns). The folder-based path (`tuneforge export --adapter DIR`) is in `command`.
"""

from __future__ import annotations

import logging
import tempfile
import types
from pathlib import Path

from tuneforge.integration.peft import base_model

log = logging.getLogger(__name__)

SAVE_METHODS = ("lora", "merged_16bit", "merged_4bit")
_SAVE_ALIASES = {"merged_4bit_forced": "merged_4bit"}


def _check_unsupported(function: str, extra: dict) -> None:
    if extra:
        raise NotImplementedError(f"{function}: argument(s) {', '.join(sorted(extra))} are not supported by tuneforge")


def _base(model):
    return base_model(model)


def save_pretrained_merged(model, save_directory: str | Path, tokenizer=None, save_method: str = "merged_16bit",
                           dtype: str | None = None, max_shard_size: str | int = "5GB", verify: bool = True,
                           **unsupported) -> Path:
    """Save the adapter ("lora"), or the merged model in 16-bit ("merged_16bit") or NF4 ("merged_4bit").

    dtype: the 16-bit type of merged weights ("float16" / "bfloat16" / "float32"); default: the
    model's own 16-bit dtype, else bfloat16.
    verify: reload the export and check it against `model` (export.verify; export_report.json).
    """
    from tuneforge.export.adapter import save_adapter
    from tuneforge.export.merge import ModuleSource, merge_model, resolve_dtype

    _check_unsupported("save_pretrained_merged", unsupported)
    method = _SAVE_ALIASES.get(save_method, save_method)
    if method not in SAVE_METHODS:
        raise ValueError(f"save_method {save_method!r} is not one of {', '.join(SAVE_METHODS)}")
    save_directory = Path(save_directory)
    clear_earlier_weights(save_directory)
    if method == "lora":
        out = save_adapter(model, save_directory, tokenizer)
    elif method == "merged_16bit":
        out = merge_model(model, save_directory, tokenizer, dtype=dtype, max_shard_size=max_shard_size)
    else:
        from tuneforge.export.merge4bit import write_merged_4bit

        source = ModuleSource(model)
        out = write_merged_4bit(source, save_directory, resolve_dtype(dtype, source.config), max_shard_size)
        _save_side_files(model, tokenizer, out)
    if verify:
        from tuneforge.export.verify import verify_in_memory

        verify_in_memory(model, tokenizer, method, [Path(out)])
    return out


# What a loader reads as a model or an adapter in a folder: an earlier export's files of these
# kinds would sit beside the new ones and be picked instead of them (a single model.safetensors
# is read before a new sharded set's index; an adapter_config.json beside merged weights makes
# transformers apply that adapter again on top of them).
_WEIGHT_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
                    "pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json",
                    "adapter_model.safetensors", "adapter_model.bin", "adapter_config.json")


def clear_earlier_weights(save_directory: Path) -> list[str]:
    """Remove an earlier export's weight and adapter files from `save_directory` (logged), so the
    folder holds only what this call writes; every other file (GGUFs, a Modelfile, the user's own)
    stays. Notebooks save several exports into one folder in separate cells: this keeps the folder
    loadable as the last one instead of refusing it."""
    if not save_directory.is_dir():
        return []
    removed = sorted({path.name for pattern in _WEIGHT_PATTERNS for path in save_directory.glob(pattern)})
    for name in removed:
        (save_directory / name).unlink()
    if removed:
        log.warning("%s held an earlier export; removed its %s so that loaders read this one", save_directory,
                    ", ".join(removed))
    return removed


def _save_side_files(model, tokenizer, out: Path) -> None:
    generation_config = getattr(_base(model), "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def save_pretrained_gguf(model, save_directory: str | Path, tokenizer, quantization_method="q8_0",
                         modelfile: bool = True, verify: bool = True, **unsupported) -> list[Path]:
    """Merge (if a peft model) and write one GGUF per quantization method, plus an Ollama Modelfile.

    quantization_method: "f32", "f16", "bf16", "q8_0" (and q4_0 / q4_1 / q5_0 / q5_1) are written
    natively; K-quants ("q4_k_m", "q5_k_m", "q6_k", ...) go through llama.cpp's quantiser
    (`pip install 'tuneforge[gguf]'`). Unsloth's "not_quantized" / "fast_quantized" / "quantized"
    mean f16 / q8_0 / q4_k_m. A list writes several files. verify: check each file (llama.cpp) and
    the Modelfile against `model` (export.verify; export_report.json).
    """
    from tuneforge.export.gguf import save_gguf
    from tuneforge.export.merge import ModuleSource
    from tuneforge.export.ollama import write_modelfile

    _check_unsupported("save_pretrained_gguf", unsupported)
    if tokenizer is None:
        raise ValueError("save_pretrained_gguf needs the tokenizer: the GGUF carries the vocabulary")
    save_directory = Path(save_directory)
    paths = save_gguf(ModuleSource(model), tokenizer, save_directory, quantization_method,
                      basename=save_directory.name or "model")
    if modelfile:
        _replacing_modelfile(save_directory / "Modelfile", paths[0])
        base = _base(model)
        write_modelfile(paths[0], tokenizer, getattr(base, "generation_config", None),
                        num_ctx=min(4096, getattr(base.config, "max_position_embeddings", 4096)))
        if len(paths) > 1:
            log.info("Modelfile: FROM ./%s (the first method asked for); for another file, edit its FROM line",
                     paths[0].name)
    if verify:
        from tuneforge.export.verify import verify_in_memory

        verify_in_memory(model, tokenizer, "gguf", paths + ([save_directory / "Modelfile"] if modelfile else []))
    return paths


def _replacing_modelfile(modelfile: Path, gguf: Path) -> None:
    """One Modelfile per folder: a later call (the notebooks save f16, q8_0, q4_k_m into one folder
    in separate cells) points it at its own file, and says which file it pointed at before."""
    if not modelfile.is_file():
        return
    previous = next((line[len("FROM "):].strip() for line in modelfile.read_text().splitlines()
                     if line.startswith("FROM ")), None)
    if previous and previous != f"./{gguf.name}":
        log.warning("%s pointed at %s; it now points at ./%s (the GGUF of this call)", modelfile, previous, gguf.name)


def push_to_hub_merged(model, repo_id: str, tokenizer=None, save_method: str = "merged_16bit",
                       token: str | None = None, private: bool = False, **kwargs) -> str:
    """save_pretrained_merged into a temporary folder, then upload it to `repo_id`.

    The Hub, the token and the repo are checked first (hub.open_repo), so an unreachable Hub fails
    in seconds, before the (possibly long) merge."""
    from tuneforge.export.hub import open_repo, push_folder

    open_repo(repo_id, token=token, private=private)
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained_merged(model, folder, tokenizer, save_method=save_method, **kwargs)
        return push_folder(folder, repo_id, token=token, private=private, temporary=True)


def push_to_hub_gguf(model, repo_id: str, tokenizer, quantization_method="q8_0", token: str | None = None,
                     private: bool = False, **kwargs) -> str:
    """save_pretrained_gguf into a temporary folder, then upload the GGUF file(s) and Modelfile
    (the Hub checked first, as push_to_hub_merged)."""
    from tuneforge.export.hub import open_repo, push_folder

    open_repo(repo_id, token=token, private=private)
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / repo_id.split("/")[-1]
        save_pretrained_gguf(model, target, tokenizer, quantization_method=quantization_method, **kwargs)
        return push_folder(target, repo_id, token=token, private=private, temporary=True)


EXPORT_METHODS = {
    "save_pretrained_merged": save_pretrained_merged,
    "save_pretrained_gguf": save_pretrained_gguf,
    "push_to_hub_merged": push_to_hub_merged,
    "push_to_hub_gguf": push_to_hub_gguf,
}


def attach_export_methods(model):
    """Bind the four export functions onto `model` as methods; returns the model."""
    for name, function in EXPORT_METHODS.items():
        setattr(model, name, types.MethodType(function, model))
    return model


__all__ = ["SAVE_METHODS", "attach_export_methods", *EXPORT_METHODS]
