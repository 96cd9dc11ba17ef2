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

import numpy as np
import torch

from tuneforge.export.gguf_arch import arch_for, extra_tensors, write_metadata
from tuneforge.export.gguf_tokenizer import vocab_from_tokenizer

log = logging.getLogger(__name__)

# Unsloth's names for the common choices.
ALIASES = {"not_quantized": "f16", "fast_quantized": "q8_0", "quantized": "q4_k_m", "f32": "f32"}
NATIVE = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
LLAMA_CPP = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k",
             "iq4_nl", "iq4_xs")
INSTALL_HINT = "pip install 'tuneforge[gguf]'"


def normalize_method(method: str) -> str:
    name = ALIASES.get(method.lower(), method.lower())
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
    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType


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
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.name.upper()], config.num_hidden_layers)
    vocab = vocab_from_tokenizer(tokenizer, config.vocab_size)
    extras = extra_tensors(arch, config)

    plan: list[_Planned] = []
    fallback = []
    for info in source.infos:
        gguf_name = tensor_map.get_name(info.name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"tensor {info.name!r} has no GGUF name for architecture {arch.name}")
        qtype = _choose_type(method, info.shape)
        if len(info.shape) > 1 and qtype != _ggml_type(method):
            fallback.append(gguf_name)
        plan.append(_Planned(info.name, gguf_name, info.shape, qtype))
    if fallback:
        log.info("%d tensor(s) have rows not a multiple of the %s block; written as F16: %s", len(fallback),
                 method.upper(), ", ".join(fallback[:4]) + (" ..." if len(fallback) > 4 else ""))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch.name)
    writer.add_name(name or path.stem)
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
    planned = iter(plan)
    bar = tqdm(total=len(plan), desc=f"writing {path.name}", disable=not progress, unit="tensor")
    for hf_name, tensor in source.tensors():
        item = next(planned)
        if item.hf_name != hf_name:  # the two passes must agree on order; a bug if not
            raise RuntimeError(f"tensor order changed between passes: {item.hf_name} vs {hf_name}")
        data = arch.transform(item.gguf_name, tensor.float(), config)
        writer.write_tensor_data(_encode(data, item.qtype))
        bar.update()
    bar.close()
    writer.close()
    log.info("wrote %s (%s, %.1f MB)", path, method.upper(), path.stat().st_size / 1e6)
    return path


def _config_kwargs(config: dict) -> dict:
    kwargs = dict(config)
    model_type = kwargs.pop("model_type", None)
    if model_type is None:
        raise ValueError("config has no model_type; cannot tell the GGUF architecture")
    return {"model_type": model_type, **kwargs}


def _choose_type(method: str, shape: tuple[int, ...]):
    import gguf

    if len(shape) <= 1 or method == "f32":
        # Norms, biases and other vectors stay F32: llama.cpp reads them as F32 and they are tiny.
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
