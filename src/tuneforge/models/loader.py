"""Load a causal LM and its tokenizer: resolve the name, quantise, scale RoPE, fix the tokenizer.

The steps, in order:
  name      -> a local folder (shipped model, local path) or a Hub id (registry twin)
  config    -> family (from `model_type`) and RoPE scaling for longer contexts
  weights   -> NF4 4-bit (double-quantised) | int8 | 16-bit | fp32, compute dtype auto
  tokenizer -> a pad token distinct from EOS, right padding for training
  patch     -> kernel-backed forwards for families that have them
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tuneforge import switches
from tuneforge.device import default_compute_dtype, device_map as rank_device_map, has_cuda
from tuneforge.integration.peft import base_model
from tuneforge.models import registry, shipped
from tuneforge.models.families import FamilySpec, family_for_model_type
from tuneforge.models.record import ModelRecord

logger = logging.getLogger(__name__)

_DTYPES = {
    "auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
}

# Tokens that tokenizers ship for padding, tried in order before adding a new one.
_PAD_CANDIDATES = (
    "<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|PAD_TOKEN|>", "<|fim_pad|>",
    "<|endoftext|>",
)


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class Source:
    """Where the weights come from. `path` is a local folder, or a Hub id when `hub` is True."""

    path: str
    hub: bool
    requested: str


def resolve_source(model_name: str, load_in_4bit: bool) -> Source:
    """Shipped models and local folders first; anything else is a Hub id (if the network allows)."""
    if shipped.shipped_model(model_name) is not None:
        return Source(str(shipped.converted_path(model_name)), hub=False, requested=model_name)
    path = Path(model_name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a folder but has no config.json: not a Hugging Face model folder")
        return Source(str(path), hub=False, requested=model_name)
    looks_like_path = model_name.startswith((".", "/", "~")) or model_name.count("/") > 1 or os.sep == "\\"
    if looks_like_path or path.suffix in (".gguf", ".safetensors", ".bin"):
        raise ModelLoadError(f"model path not found: {model_name}")
    hub_id = registry.resolve_name(model_name, load_in_4bit)
    if hub_id != model_name:
        logger.info("%s -> %s (registry)", model_name, hub_id)
    return Source(hub_id, hub=True, requested=model_name)


def _hub_error(source: Source, error: Exception, offline: bool) -> ModelLoadError:
    why = ("offline mode is on: HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE" if offline
           else f"{type(error).__name__}: {str(error).splitlines()[0]}")
    return ModelLoadError(
        f"could not load {source.requested!r} from the Hugging Face Hub ({why}). Pass a local model folder, "
        f"or a shipped model ({', '.join(shipped.SHIPPED_MODELS)}); for gated models pass token=..."
    )


def resolve_dtype(dtype) -> torch.dtype:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or default_compute_dtype()
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype] or default_compute_dtype()
    raise ValueError(f"dtype must be a torch dtype or one of {sorted(_DTYPES)}, got {dtype!r}")


def apply_rope_scaling(config, max_seq_length: int, rope_scaling: dict | None) -> None:
    """Make `config` cover `max_seq_length` positions.

    A model trained with plain RoPE gets linear position interpolation with factor
    ceil(max_seq_length / trained length); one that already has a scaling scheme (llama3, yarn,
    longrope) keeps it and only its position limit grows, with a log line. An explicit
    `rope_scaling` dict always wins.
    """
    parameters = dict(getattr(config, "rope_parameters", None) or {})
    trained = getattr(config, "max_position_embeddings", None)
    if rope_scaling is not None:
        parameters.update(rope_scaling)
        parameters.setdefault("rope_type", parameters.pop("type", "linear"))
        config.rope_parameters = parameters
        logger.info("RoPE scaling set by the caller: %s", parameters)
    elif trained and max_seq_length > trained:
        rope_type = parameters.get("rope_type", "default")
        if rope_type == "default":
            factor = float(math.ceil(max_seq_length / trained))
            parameters.update(rope_type="linear", factor=factor)
            config.rope_parameters = parameters
            logger.info(
                "max_seq_length %d > trained length %d: linear RoPE scaling, factor %.0f",
                max_seq_length, trained, factor,
            )
        else:
            logger.warning(
                "max_seq_length %d > max_position_embeddings %d; keeping the model's own %r RoPE scaling",
                max_seq_length, trained, rope_type,
            )
    if trained and max_seq_length > trained:
        config.max_position_embeddings = max_seq_length


def quant_storage_dtype(compute_dtype: torch.dtype, fsdp: bool) -> torch.dtype:
    """The dtype bitsandbytes stores packed NF4 codes in.

    uint8 normally. Under FSDP the compute dtype: the bytes are the same, but FSDP2 shards only
    floating parameters, and one dtype for all base weights keeps each shard group's all-gather a
    single flat buffer.
    """
    return compute_dtype if fsdp else torch.uint8


def quantization_config(load_in_4bit: bool, load_in_8bit: bool, compute_dtype: torch.dtype,
                        quant_storage: torch.dtype | None = None, *, fsdp: bool = False):
    """quant_storage: dtype of the packed NF4 codes; None: `quant_storage_dtype(compute_dtype, fsdp)`
    (fsdp: the `fsdp` switch the loader resolved)."""
    if not (load_in_4bit or load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    if quant_storage is None:
        quant_storage = quant_storage_dtype(compute_dtype, fsdp)
        if quant_storage != torch.uint8:
            logger.info("FSDP run: NF4 codes stored as %s so that FSDP2 can shard them", quant_storage)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage,
    )


def fix_tokenizer(tokenizer, model=None):
    """Right padding for training and a pad token that is not EOS.

    A pad token equal to EOS makes collators that mask padding mask every EOS too, so the model
    never learns to stop. We reuse a padding-like token the vocabulary already has, and only add
    a new one (growing the embeddings) when there is none.
    """
    tokenizer.padding_side = "right"
    eos = tokenizer.eos_token
    if tokenizer.pad_token is not None and tokenizer.pad_token != eos:
        return tokenizer
    vocab = tokenizer.get_vocab()
    for candidate in _PAD_CANDIDATES + ((tokenizer.unk_token,) if tokenizer.unk_token else ()):
        if candidate and candidate != eos and candidate in vocab and candidate != tokenizer.bos_token:
            tokenizer.pad_token = candidate
            logger.info("pad token set to %r (id %d), distinct from EOS %r", candidate, vocab[candidate], eos)
            break
    else:
        tokenizer.add_special_tokens({"pad_token": "<|PAD_TOKEN|>"})
        logger.warning("tokenizer had no usable pad token: added <|PAD_TOKEN|>; embeddings resized")
        if model is not None:
            model.resize_token_embeddings(len(tokenizer))
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def load_model(
    model_name: str,
    max_seq_length: int = 2048,
    dtype=None,
    load_in_4bit: bool = True,
    load_in_8bit: bool = False,
    full_finetuning: bool = False,
    token: str | None = None,
    device_map=None,
    rope_scaling: dict | None = None,
    fix_tokenizer_: bool = True,
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = None,
    use_kernels: bool | None = None,
    fsdp: bool | None = None,
    **from_pretrained_kwargs,
):
    """Returns (model, tokenizer). See `FastLanguageModel.from_pretrained` for the arguments.

    fsdp: the model will be sharded with FSDP2 (NF4 codes stored in the compute dtype); None: the
    environment's `accelerate launch --use_fsdp`. `tuneforge train --strategy fsdp` passes True.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if load_in_4bit and load_in_8bit:
        raise ValueError("load_in_4bit and load_in_8bit are both True: choose one")
    if full_finetuning and (load_in_4bit or load_in_8bit):
        logger.info("full_finetuning=True: loading in 16/32-bit, quantisation off")
        load_in_4bit = load_in_8bit = False
    if max_seq_length <= 0:
        raise ValueError(f"max_seq_length must be > 0, got {max_seq_length}")
    compute_dtype = resolve_dtype(dtype)
    # Every switch (arguments, then the environment) decided once, before anything loads.
    resolved = switches.resolve(kernels=resolve_use_kernels(use_kernels), fsdp=fsdp)
    source = resolve_source(model_name, load_in_4bit)
    hub_kwargs = dict(token=token, revision=revision, trust_remote_code=trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(source.path, **hub_kwargs)
    except (OSError, ValueError) as error:
        if source.hub:
            raise _hub_error(source, error, resolved.offline) from None
        raise ModelLoadError(f"{source.path}: could not read config.json: {error}") from None

    spec = family_for_model_type(config.model_type)
    if spec is None:
        logger.warning(
            "model_type %r has no tuneforge family: it loads and trains on the plain transformers path "
            "(no kernels)", config.model_type,
        )
    apply_rope_scaling(config, max_seq_length, rope_scaling)
    if attn_implementation is None:
        attn_implementation = spec.attn_implementation if spec else "sdpa"

    # Pre-quantised checkpoints carry their own quantization_config; don't stack another on top.
    prequantised = getattr(config, "quantization_config", None)
    quantization = None if prequantised is not None else \
        quantization_config(load_in_4bit, load_in_8bit, compute_dtype, fsdp=resolved.fsdp)
    model_class = AutoModelForCausalLM
    if spec is not None and spec.linear_subclasses and _is_bitsandbytes(prequantised if quantization is None else quantization):
        model_class = _with_plain_linears(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)], spec.linear_subclasses)
        logger.info("family %s: %s layers built as nn.Linear so that bitsandbytes quantises them",
                    spec.name, ", ".join(spec.linear_subclasses))
    nf4_experts = spec is not None and bool(spec.experts) and load_in_4bit and _is_bitsandbytes(quantization)
    if nf4_experts:
        from tuneforge.models.moe import quantizing_class

        # Each stacked expert weight becomes NF4 as it is loaded (one dense stack in memory at a time).
        model_class = quantizing_class(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)], spec)
    if device_map is None:
        # Under torchrun each rank loads onto its own GPU (LOCAL_RANK).
        device_map = rank_device_map()
    try:
        model = model_class.from_pretrained(
            source.path,
            config=config,
            dtype=compute_dtype,
            quantization_config=quantization,
            device_map=device_map,
            attn_implementation=attn_implementation,
            **hub_kwargs,
            **from_pretrained_kwargs,
        )
        if model_class is not AutoModelForCausalLM:
            model.__class__ = model_class.__bases__[0]  # the family's own class from here on
        tokenizer = None
        if source.hub or _has_tokenizer_files(Path(source.path)):
            tokenizer = AutoTokenizer.from_pretrained(source.path, **hub_kwargs)
        else:
            logger.warning("%s has no tokenizer files: returning tokenizer=None (feed token ids yourself)",
                           source.path)
    except OSError as error:
        if source.hub:
            raise _hub_error(source, error, resolved.offline) from None
        raise

    if fix_tokenizer_ and tokenizer is not None:
        fix_tokenizer(tokenizer, model)
    model.max_seq_length = max_seq_length
    if tokenizer is not None:
        tokenizer.model_max_length = max_seq_length
    kind = "nf4" if load_in_4bit else "int8" if load_in_8bit else str(compute_dtype).replace("torch.", "")
    logger.info(
        "loaded %s (%s, family %s) as %s, compute %s, %.1fM parameters",
        source.requested, config.model_type, spec.name if spec else "-", kind,
        str(compute_dtype).replace("torch.", ""), model.num_parameters() / 1e6,
    )

    if nf4_experts:
        # bitsandbytes quantises nn.Linear only: the stacked 3-D experts (most of a MoE model)
        # are NF4 in tuneforge's own storage (models.moe), their forward kernels.moe.
        from tuneforge.models.moe import quantize_experts

        quantize_experts(model, spec)

    from tuneforge.integration.bnb import prepare

    prepare(model)  # bitsandbytes' CPU repack off, and its wrong CPU dequantisation avoided (see there)
    record = ModelRecord(switches=resolved, family=spec)
    model.tuneforge = record
    logger.info(record.switches.line())
    return model, tokenizer


def _is_bitsandbytes(quantization) -> bool:
    """A BitsAndBytesConfig, or a checkpoint's quantization_config (object or dict) made by one."""
    if quantization is None:
        return False
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization, "quant_method", None)
    return str(getattr(method, "value", method)) == "bitsandbytes"


def _with_plain_linears(model_class, names: tuple[str, ...]):
    """A subclass of `model_class` whose __init__ turns the nn.Linear subclasses named `names` into
    plain nn.Linear.

    transformers 5's bitsandbytes integration swaps only modules with `type(module) is nn.Linear`
    for Linear4bit / Linear8bitLt (`replace_with_bnb_linear`), right after __init__ on the meta
    device, so Falcon's FalconLinear (which only computes x @ W.T + b) would stay dense. Changing
    the instances' class in __init__ keeps their parameters and names, so checkpoints load as usual
    and the quantiser sees plain nn.Linear. The subclass exists for one from_pretrained call; the
    loaded model gets `model_class` back as its class. It keeps the name and module: transformers
    reads both (the saved `architectures`, its checks of the modeling source).
    """
    from torch import nn

    def __init__(self, config, *args, **kwargs):
        model_class.__init__(self, config, *args, **kwargs)
        for module in self.modules():
            if type(module).__name__ in names and isinstance(module, nn.Linear):
                module.__class__ = nn.Linear

    return type(model_class.__name__, (model_class,), {
        "__init__": __init__, "__module__": model_class.__module__, "__qualname__": model_class.__qualname__,
    })


def resolve_use_kernels(use_kernels: bool | None) -> bool | None:
    """None (auto): kernels on a GPU; off on the CPU, where Triton only has its interpreter, which
    is orders of magnitude slower than eager PyTorch (kernel tests use it, training must not).
    True forces them anywhere; False, or TUNEFORGE_DISABLE_KERNELS=1 (the `kernels` switch), turns
    them off."""
    if use_kernels is None and not has_cuda():
        logger.info("no CUDA device: Triton kernels off (plain PyTorch path); use_kernels=True forces them")
        return False
    return use_kernels


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def _has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


def family_of(model) -> FamilySpec | None:
    """The family spec recorded on a model (or its peft wrapper) at load time."""
    base = base_model(model)
    record = base.__dict__.get("tuneforge")
    spec = record.family if record is not None else None
    if spec is None:
        spec = family_for_model_type(base.config.model_type)
    return spec
