"""GGUF export, written natively with the `gguf` package and streamed tensor by tensor.

F32 / F16 / BF16 / Q8_0 (and the other simple block quants the `gguf` package implements:
Q4_0, Q4_1, Q5_0, Q5_1) are written directly. K-quants and friends (q4_k_m, q5_k_m, q6_k, ...)
go through llama.cpp's own quantiser (`llama_cpp.llama_model_quantize`, the `tuneforge[gguf]`
extra) from a 16-bit GGUF written first, because llama.cpp's quantisation mixes (which tensors
get more bits) live in its C++ code.

The file is written in two passes over the source: tensor names, shapes and types first (the
GGUF header holds them all), then each tensor's data, so only one tensor is in memory at once.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tuneforge.export.gguf_arch import (
    UnsupportedForGGUF,
    arch_for,
    check_config,
    extra_tensors,
    split_parts,
    stack_target,
    write_metadata,
)
from tuneforge.export.gguf_tokenizer import vocab_from_tokenizer

log = logging.getLogger(__name__)

# Unsloth's names for the common choices.
ALIASES = {"not_quantized": "f16", "fast_quantized": "q8_0", "quantized": "q4_k_m", "f32": "f32"}
NATIVE = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
LLAMA_CPP = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k",
             "iq4_nl", "iq4_xs", "iq3_s", "iq3_m")
# llama.cpp's other file types, and why they are not made here (llama-quant.cpp).
REFUSED = {
    **{name: "llama.cpp makes it only with an importance matrix (llama-imatrix over calibration text), which "
             "tuneforge does not compute; q2_k, q3_k_s or iq3_s are the nearest types without one"
       for name in ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "q2_k_s")},
    **{name: "a ternary type for models trained with ternary weights (BitNet b1.58); it would destroy a "
             "fine-tuned 16-bit model's weights" for name in ("tq1_0", "tq2_0")},
}
INSTALL_HINT = "pip install 'tuneforge[gguf]'"


def normalize_method(method: str) -> str:
    name = ALIASES.get(method.lower(), method.lower())
    if name in REFUSED:
        raise ValueError(f"GGUF quantization_method {method!r}: {REFUSED[name]}")
    if name not in NATIVE + LLAMA_CPP:
        raise ValueError(f"unknown GGUF quantization_method {method!r}; choose one of "
                         f"{', '.join(NATIVE + LLAMA_CPP)} (or {', '.join(ALIASES)})")
    return name


def _ggml_type(method: str):
    import gguf

    return gguf.GGMLQuantizationType[method.upper()]


def _file_type(method: str):
    import gguf

    names = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16"}
    return gguf.LlamaFileType[names.get(method, "MOSTLY_" + method.upper())]


@dataclass
class _Planned:
    """One GGUF tensor: made from one HF tensor, stacked from several (per-head norms), or cut
    from one (a MoE's [gate; up] experts)."""

    sources: list[str]  # HF names, in the order they are stacked
    gguf_name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    cut: Callable | None = None  # the part of the source this tensor is (GGUFArch.split)

    def data(self, parts: list[torch.Tensor]) -> torch.Tensor:
        data = torch.stack(parts) if len(parts) > 1 else parts[0]
        return self.cut(data).contiguous() if self.cut else data


def _model_arch(name: str):
    import gguf

    return next(arch for arch, arch_name in gguf.MODEL_ARCH_NAMES.items() if arch_name == name)


def plan_tensors(infos, arch, config, method: str) -> list[_Planned]:
    """The GGUF tensors, in the order the source's tensors complete them.

    infos: the source's `TensorInfo`s in streaming order. A stacked tensor (StableLM's per-head
    q/k norms) is written once its last head has streamed by; a split one (a MoE's stacked
    [gate; up] experts) as its parts, one after the other; a tied output that llama.cpp
    requires as its own tensor (OLMo 2, StableLM) is the embedding written a second time.
    """
    import gguf

    tensor_map = gguf.get_tensor_name_map(_model_arch(arch.name), config.num_hidden_layers)
    stacks: dict[str, list] = {}
    for info in infos:
        target = stack_target(arch, info.name)
        if target is not None:
            stacks.setdefault(target[0], []).append((target[1], info))
    plan: list[_Planned] = []
    seen: dict[str, int] = {}
    tied = getattr(config, "tie_word_embeddings", False)
    for info in infos:
        parts = split_parts(arch, info.name)
        if parts is not None:
            for part, cut in parts:
                shape = tuple(cut(torch.empty(info.shape, device="meta")).shape)
                gguf_name = _gguf_name(tensor_map, part, arch)
                plan.append(_Planned([info.name], gguf_name, shape, _choose_type(method, shape, gguf_name), cut))
            continue
        target = stack_target(arch, info.name)
        if target is not None:
            seen[target[0]] = seen.get(target[0], 0) + 1
            if seen[target[0]] < len(stacks[target[0]]):
                continue
            heads = [head for _, head in sorted(stacks[target[0]], key=lambda item: item[0])]
            hf_name, shape = target[0], (len(heads), *heads[0].shape)
            sources = [head.name for head in heads]
        else:
            hf_name, shape, sources = info.name, info.shape, [info.name]
        gguf_name = _gguf_name(tensor_map, hf_name, arch)
        plan.append(_Planned(sources, gguf_name, shape, _choose_type(method, shape, gguf_name)))
        if gguf_name == "token_embd.weight" and tied and arch.output == "required":
            plan.append(_Planned(sources, "output.weight", shape, _choose_type(method, shape, "output.weight")))
    return plan


def _gguf_name(tensor_map, hf_name: str, arch) -> str:
    gguf_name = tensor_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if gguf_name is None:
        raise UnsupportedForGGUF(f"tensor {hf_name!r} has no GGUF name for architecture {arch.name}")
    return gguf_name


def write_gguf(source, tokenizer, path: str | Path, method: str = "f16", name: str | None = None,
               progress: bool = True) -> Path:
    """source: a merge source (`merge.CheckpointSource` / `merge.ModuleSource`) -> one GGUF file.

    method: one of NATIVE; the file is llama.cpp-loadable as written.
    """
    import gguf
    from tqdm.auto import tqdm
    from transformers import AutoConfig

    method = normalize_method(method)
    if method not in NATIVE:
        raise ValueError(f"{method} is made by llama.cpp's quantiser: use save_gguf(), not write_gguf()")
    config = AutoConfig.for_model(**_config_kwargs(source.config))
    arch = arch_for(config)
    check_config(arch, config)
    vocab = vocab_from_tokenizer(tokenizer, config.vocab_size)
    extras = extra_tensors(arch, config)
    plan = plan_tensors(source.infos, arch, config, method)
    fallback = [item.gguf_name for item in plan if len(item.shape) > 1 and item.qtype != _ggml_type(method)]
    if fallback:
        log.info("%d tensor(s) have rows not a multiple of the %s block; written as F16: %s", len(fallback),
                 method.upper(), ", ".join(fallback[:4]) + (" ..." if len(fallback) > 4 else ""))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch.name)
    writer.add_name(vocab.general_name(name or path.stem, arch.name))
    writer.add_file_type(_file_type(method))
    if method not in ("f32", "f16", "bf16"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_metadata(writer, arch, config)
    vocab.write(writer)
    for extra_name, tensor in extras.items():
        writer.add_tensor_info(extra_name, tuple(tensor.shape), np.float32, tensor.numel() * 4,
                               raw_dtype=gguf.GGMLQuantizationType.F32)
    for item in plan:
        writer.add_tensor_info(item.gguf_name, item.shape, np.float32, _nbytes(item.shape, item.qtype),
                               raw_dtype=item.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in extras.values():
        writer.write_tensor_data(tensor.numpy())
    bar = tqdm(total=len(plan), desc=f"writing {path.name}", disable=not progress, unit="tensor")
    last_use = {name: index for index, item in enumerate(plan) for name in item.sources}
    ready: dict[str, torch.Tensor] = {}  # streamed tensors that a planned item still needs
    done = 0
    for hf_name, tensor in source.tensors():
        ready[hf_name] = tensor
        while done < len(plan) and all(name in ready for name in plan[done].sources):
            item = plan[done]
            data = item.data([ready[name].float() for name in item.sources])
            writer.write_tensor_data(_encode(arch.transform(item.gguf_name, data, config), item.qtype))
            for name in item.sources:
                if last_use[name] == done:
                    del ready[name]
            done += 1
            bar.update()
    bar.close()
    if done < len(plan):  # the two passes must agree; a bug if not
        raise RuntimeError(f"the source ended before {plan[done].gguf_name} was written")
    writer.close()
    log.info("wrote %s (%s, %.1f MB)", path, method.upper(), path.stat().st_size / 1e6)
    return path


def _config_kwargs(config: dict) -> dict:
    kwargs = dict(config)
    model_type = kwargs.pop("model_type", None)
    if model_type is None:
        raise ValueError("config has no model_type; cannot tell the GGUF architecture")
    return {"model_type": model_type, **kwargs}


def _choose_type(method: str, shape: tuple[int, ...], gguf_name: str = ""):
    import gguf

    if len(shape) <= 1 or gguf_name.endswith(("_norm.weight", "ffn_gate_inp.weight", ".bias")) or method == "f32":
        # Norms (per-head ones are 2-D), biases and other vectors stay F32: llama.cpp's CPU
        # multiplies activations by them only in F32, and they are tiny. A MoE router too, as
        # llama.cpp's converter and quantiser keep it: rounding it would flip routing decisions.
        # Per-expert biases ([experts, out]) are vectors too.
        return gguf.GGMLQuantizationType.F32
    qtype = _ggml_type(method)
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    import gguf

    return int(np.prod(gguf.quants.quant_shape_to_byte_shape(shape, qtype)))


def _encode(tensor: torch.Tensor, qtype) -> np.ndarray:
    import gguf

    array = tensor.detach().cpu().float().numpy()
    return gguf.quants.quantize(array, qtype)


# ---------------------------------------------------------------------------------------------
# llama.cpp quantiser
# ---------------------------------------------------------------------------------------------


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as error:
        raise ImportError(f"K-quant GGUF export runs llama.cpp's quantiser, which needs llama-cpp-python: "
                          f"{INSTALL_HINT}") from error
    return llama_cpp


def quantize_with_llama_cpp(source_gguf: str | Path, target: str | Path, method: str) -> Path:
    """source_gguf (16/32-bit) -> target in `method` (e.g. q4_k_m), by llama.cpp's llama_model_quantize."""
    llama_cpp = _llama_cpp()
    method = normalize_method(method)
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{method.upper()}", None)
    if ftype is None:
        raise ValueError(f"this llama-cpp-python has no quantisation type {method!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(str(source_gguf).encode(), str(target).encode(), params)
    if status != 0:
        raise RuntimeError(f"llama.cpp failed to quantise {source_gguf} to {method} (status {status})")
    log.info("quantised %s -> %s (%s)", source_gguf, target, method.upper())
    return Path(target)


def gguf_filename(save_directory: Path, method: str, basename: str = "model") -> Path:
    return save_directory / f"{basename}.{method.upper()}.gguf"


def save_gguf(source, tokenizer, save_directory: str | Path, methods: str | list[str] = "f16",
              basename: str | None = None, progress: bool = True) -> list[Path]:
    """Write one GGUF per method into save_directory; K-quants pass through a temporary F16/BF16 file."""
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    methods = [normalize_method(m) for m in ([methods] if isinstance(methods, str) else methods)]
    if any(m not in NATIVE for m in methods):
        _llama_cpp()  # fail before any work when the quantiser is missing
    basename = basename or "model"
    written: dict[str, Path] = {}
    for method in [m for m in methods if m in NATIVE]:
        written[method] = write_gguf(source, tokenizer, gguf_filename(save_directory, method, basename), method,
                                     name=basename, progress=progress)
    quantised = [m for m in methods if m not in NATIVE]
    if quantised:
        # llama.cpp quantises from the highest-precision 16-bit file at hand.
        base_method = "bf16" if source.config.get("dtype", source.config.get("torch_dtype")) == "bfloat16" else "f16"
        base = written.get(base_method)
        scratch = None
        if base is None:
            scratch = tempfile.TemporaryDirectory(dir=save_directory)
            base = write_gguf(source, tokenizer, Path(scratch.name) / f"{basename}.{base_method.upper()}.gguf",
                              base_method, name=basename, progress=progress)
        try:
            for method in quantised:
                written[method] = quantize_with_llama_cpp(base, gguf_filename(save_directory, method, basename),
                                                          method)
        finally:
            if scratch is not None:
                scratch.cleanup()
    return [written[m] for m in methods]
