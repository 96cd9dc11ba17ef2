"""`FastLanguageModel`: the Unsloth-compatible entry point (same names, same arguments)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from tuneforge.data.templates import accept_batched_columns
from tuneforge.export import attach_export_methods
from tuneforge.integration.peft import base_model
from tuneforge.lora.inject import get_peft_model
from tuneforge.models.loader import ModelLoadError, load_model
from tuneforge.models.record import record_of
from tuneforge.patch import patch_model

logger = logging.getLogger(__name__)


def adapter_folder(model_name) -> Path | None:
    """The folder holding adapter_config.json when `model_name` is an adapter folder (what
    `model.save_pretrained("lora_model")` writes) or a `tuneforge train` run folder; else None."""
    path = Path(str(model_name)).expanduser()
    if not path.is_dir():
        return None
    if (path / "adapter_config.json").is_file():
        if (path / "config.json").is_file():
            logger.info("%s holds both config.json and adapter_config.json: loading it as an adapter", path)
        return path
    if (path / "adapter" / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return path / "adapter"
    return None


def _base_of_adapter(folder: Path) -> str:
    config = json.loads((folder / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{folder}/adapter_config.json names no base_model_name_or_path; load the base model "
                             "with from_pretrained, then peft.PeftModel.from_pretrained(model, folder)")
    if config.get("peft_type", "LORA") != "LORA":
        raise NotImplementedError(f"{folder}: peft_type {config['peft_type']!r}; tuneforge reloads LoRA adapters only")
    return base


def _load_adapter(folder: Path, is_trainable: bool, use_gradient_checkpointing, use_kernels, load_kwargs: dict):
    """Base model from adapter_config.json (loaded as `load_kwargs` ask: 4-bit, dtype, ...), the
    adapter on it through peft, and what get_peft_model gives a LoRA model (export methods...)."""
    from peft import PeftModel

    from tuneforge.lora.inject import finish_peft_model
    from tuneforge.models.loader import _has_tokenizer_files, family_of, fix_tokenizer

    base_name = _base_of_adapter(folder)
    logger.info("%s is a LoRA adapter: loading its base %s, then the adapter (%s)", folder, base_name,
                "trainable" if is_trainable else "frozen")
    model, tokenizer = load_model(base_name, use_kernels=use_kernels, **load_kwargs)
    patch_model(model)
    if _has_tokenizer_files(folder):
        # The adapter folder's tokenizer carries what training set: chat template, EOS, padding.
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if load_kwargs.get("fix_tokenizer_", True):
            fix_tokenizer(tokenizer, model)
        tokenizer.model_max_length = load_kwargs["max_seq_length"]
    peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=is_trainable)
    checkpointing = (use_gradient_checkpointing if use_gradient_checkpointing is not None else "unsloth") \
        if is_trainable else False
    return attach_export_methods(finish_peft_model(peft_model, family_of(model), checkpointing, use_kernels)), tokenizer


class FastLanguageModel:
    @staticmethod
    def from_pretrained(
        model_name: str = "tuneforge/smollm2-135m-instruct",
        max_seq_length: int = 2048,
        dtype=None,
        load_in_4bit: bool = True,
        load_in_8bit: bool = False,
        full_finetuning: bool = False,
        token: str | None = None,
        device_map=None,
        rope_scaling: dict | None = None,
        fix_tokenizer: bool = True,
        trust_remote_code: bool = False,
        revision: str | None = None,
        use_gradient_checkpointing=None,
        fast_inference: bool = False,
        use_kernels: bool | None = None,
        attn_implementation: str | None = None,
        is_trainable: bool = True,
        **kwargs,
    ):
        """Load `model_name` and its tokenizer; returns (model, tokenizer).

        model_name: a shipped model ("tuneforge/smollm2-135m-instruct"), a local HF folder, or a Hub
            id (needs the network; known ids map to their pre-quantised 4-bit twins). A LoRA adapter
            folder (what `model.save_pretrained("lora_model")` writes; or a `tuneforge train` run
            folder) loads its base model from adapter_config.json with the arguments given here
            (4-bit or not, dtype, max_seq_length) and the adapter on top, as Unsloth does.
        is_trainable: for an adapter folder: True (default, as Unsloth) loads the adapter trainable,
            with gradient checkpointing (`use_gradient_checkpointing`, default "unsloth"), to go on
            training; False loads it frozen, for inference. Either way the model has the export
            methods (save_pretrained_merged, save_pretrained_gguf, ...).
        dtype: None/"auto" picks bf16 on Ampere+ GPUs, fp16 on older GPUs, fp32 on the CPU.
        load_in_4bit: NF4 with double quantisation (bitsandbytes); load_in_8bit: LLM.int8.
        rope_scaling: explicit RoPE parameters; otherwise set when max_seq_length exceeds the
            trained length (see loader.apply_rope_scaling).
        use_kernels: False (or TUNEFORGE_DISABLE_KERNELS=1) keeps the plain transformers path.
        attn_implementation: None takes the family's ("sdpa", or "eager" where transformers
            refuses SDPA, e.g. Gemma 2's soft-capped attention).
        Other keyword arguments go to transformers' `from_pretrained`.
        """
        if fast_inference:
            raise NotImplementedError(
                "fast_inference=True (vLLM) is not supported by tuneforge; use FastLanguageModel.for_inference"
            )
        load_kwargs = dict(
            max_seq_length=max_seq_length,
            dtype=dtype,
            load_in_4bit=load_in_4bit,
            load_in_8bit=load_in_8bit,
            full_finetuning=full_finetuning,
            token=token,
            device_map=device_map,
            rope_scaling=rope_scaling,
            fix_tokenizer_=fix_tokenizer,
            trust_remote_code=trust_remote_code,
            revision=revision,
            attn_implementation=attn_implementation,
            **kwargs,
        )
        folder = adapter_folder(model_name)
        if folder is not None:
            if full_finetuning:
                raise ValueError(f"{model_name} is a LoRA adapter folder; full_finetuning=True needs a full model "
                                 "(save one with save_pretrained_merged(..., save_method='merged_16bit'))")
            model, tokenizer = _load_adapter(folder, is_trainable, use_gradient_checkpointing, use_kernels,
                                             load_kwargs)
            return model, accept_batched_columns(tokenizer)
        model, tokenizer = load_model(model_name, use_kernels=use_kernels, **load_kwargs)
        patch_model(model)
        accept_batched_columns(tokenizer)  # notebooks pass dataset["conversations"] to apply_chat_template
        if use_gradient_checkpointing is not None:
            # Unsloth accepts it here too; it takes effect in get_peft_model.
            record_of(model).gradient_checkpointing = use_gradient_checkpointing
        return model, tokenizer

    @staticmethod
    def get_peft_model(model, r: int = 16, target_modules=None, lora_alpha: float = 16, lora_dropout: float = 0.0,
                       bias: str = "none", use_gradient_checkpointing=None, random_state: int = 3407,
                       use_rslora: bool = False, modules_to_save=None, finetune_vision_layers: bool = False,
                       finetune_language_layers: bool = True, finetune_attention_modules: bool = True,
                       finetune_mlp_modules: bool = True, **kwargs):
        """Add LoRA adapters (see tuneforge.lora.inject.get_peft_model).

        finetune_*: Unsloth's FastModel arguments. With target_modules=None, attention and/or MLP
        projections are chosen by finetune_attention_modules / finetune_mlp_modules (the family's
        defaults, split by kind). Vision layers are not supported (text models only), and
        finetune_language_layers=False would leave nothing to train: both raise.
        """
        if hasattr(model, "peft_config"):
            return _already_adapted(model, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias,
                                    use_rslora=use_rslora, target_modules=target_modules)
        if finetune_vision_layers:
            raise NotImplementedError("finetune_vision_layers=True: tuneforge trains text models only; pass False")
        if not finetune_language_layers:
            raise ValueError("finetune_language_layers=False leaves no layer to train in a text model")
        if not (finetune_attention_modules and finetune_mlp_modules):
            target_modules = _targets_by_kind(model, target_modules, finetune_attention_modules, finetune_mlp_modules)
        if use_gradient_checkpointing is None:
            kept = record_of(model).gradient_checkpointing
            use_gradient_checkpointing = "unsloth" if kept is None else kept
        return attach_export_methods(get_peft_model(
            model, r=r, target_modules=target_modules, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            bias=bias, use_gradient_checkpointing=use_gradient_checkpointing, random_state=random_state,
            use_rslora=use_rslora, modules_to_save=modules_to_save, **kwargs,
        ))

    @staticmethod
    def for_inference(model):
        """Eval mode, KV cache on, gradient checkpointing off, and a fast `model.generate`.

        `generate` then runs a static KV cache with decode steps replayed from a CUDA graph
        (eagerly on the CPU) when it supports the call, else transformers' own generate with
        one log line saying why (see tuneforge.inference.generate).
        """
        from tuneforge.inference import enable_fast_generate
        from tuneforge.integration.bnb import allow_cpu_repack

        model.eval()
        allow_cpu_repack(model)  # bitsandbytes' faster CPU gemm; undone exactly before any read
        base = base_model(model)
        base.config.use_cache = True
        if getattr(base, "is_gradient_checkpointing", False):
            base.gradient_checkpointing_disable()
            record_of(base).resume_checkpointing = True
        return enable_fast_generate(model)

    @staticmethod
    def plan(model_name: str = "tuneforge/smollm2-135m-instruct", **kwargs):
        """Peak memory and time of a LoRA run before loading it (tuneforge.planning.plan_model's
        arguments: max_seq_length, load_in_4bit, r, batch_size, dataset, ...); print(*plan.lines(), sep="\\n")."""
        from tuneforge.planning import plan_model

        return plan_model(model_name, **kwargs)

    @staticmethod
    def for_training(model, use_gradient_checkpointing=True):
        """Train mode, KV cache off, checkpointing back on if for_inference turned it off; `generate`
        is transformers' again and the inference cache and graph are released."""
        from tuneforge.inference import disable_fast_generate

        from tuneforge.integration.bnb import prevent_cpu_repack

        disable_fast_generate(model)
        prevent_cpu_repack(model)  # the standard layout back: training reads the weights
        model.train()
        base = base_model(model)
        base.config.use_cache = False
        if record_of(base).resume_checkpointing and use_gradient_checkpointing:
            from tuneforge.patch.activation_checkpointing import enable_gradient_checkpointing

            kept = record_of(base).gradient_checkpointing
            enable_gradient_checkpointing(model, True if kept is None else kept)
            record_of(base).resume_checkpointing = False
        return model


def _already_adapted(model, **asked):
    """get_peft_model on a model that has its adapter already (reloaded from "lora_model"): the same
    settings -> the model as it is (Unsloth's pass-through, with its warning); others -> an error, as
    a second adapter on top is not what the notebook means."""
    config = model.peft_config["default"]
    differ = []
    for name, value in asked.items():
        have = getattr(config, name)
        if name == "target_modules":
            if value is None:
                continue
            value, have = set(value), set(have)
        if value != have:
            differ.append(f"{name}={value!r} (the adapter has {have!r})")
    if differ:
        raise ValueError("get_peft_model: the model already has a LoRA adapter with other settings: "
                         + "; ".join(differ) + ". Load the base model to start a new adapter")
    logger.warning("get_peft_model: the model already has this LoRA adapter; returning it unchanged")
    return model


_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "dense", "c_attn", "out_proj",
              "Wqkv")


def _targets_by_kind(model, target_modules, attention: bool, mlp: bool) -> list[str]:
    """The family's LoRA targets restricted to attention or MLP projections (FastModel's switches)."""
    from tuneforge.models.loader import family_of

    if target_modules is not None:
        raise ValueError("pass either target_modules or finetune_attention_modules / finetune_mlp_modules=False, "
                         "not both")
    if not attention and not mlp:
        raise ValueError("finetune_attention_modules=False and finetune_mlp_modules=False leave nothing to train")
    spec = family_of(model)
    if spec is None:
        raise NotImplementedError("finetune_attention_modules / finetune_mlp_modules need a known family's projection "
                                  "names; pass target_modules=[...] instead")
    chosen = [name for name in spec.lora_targets if (name in _ATTENTION) == attention]  # exactly one of the two is on
    logger.info("LoRA targets (%s only): %s", "attention" if attention else "MLP", ", ".join(chosen))
    return chosen


@torch.no_grad()
def generate_text(model, tokenizer, messages, max_new_tokens: int = 64, **generate_kwargs) -> str:
    """Apply the chat template to `messages`, greedy-generate, return the new text only."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    device = next(model.parameters()).device
    ids = {k: v.to(device) for k, v in ids.items()}
    generate_kwargs.setdefault("do_sample", False)
    output = model.generate(**ids, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                            **generate_kwargs)
    return tokenizer.decode(output[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def _sequence_length(folder: Path, fallback: int = 2048) -> int:
    """The max_seq_length to load with, so that RoPE is set up as in training: an adapter's
    tokenizer carries the training max_seq_length (the loader sets model_max_length to it); a
    model folder gets its own max_position_embeddings (a larger value would rescale RoPE)."""
    for name, key in (("tokenizer_config.json", "model_max_length"), ("config.json", "max_position_embeddings")):
        file = folder / name
        if file.is_file():
            value = json.loads(file.read_text()).get(key)
            if isinstance(value, int) and 0 < value < 10**7:  # tokenizers without a limit store ~1e30
                return value
    return fallback


def load_for_inference(model: str, load_in_4bit: bool = True):
    """(model, tokenizer) for a run folder, an adapter folder, a model folder or a shipped name."""
    path = Path(model)
    if (path / "adapter" / "adapter_config.json").is_file():  # a `tuneforge train` output folder
        path = path / "adapter"
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        from tuneforge.export.adapter import adapter_problem
        from tuneforge.models.loader import ModelLoadError

        problem = adapter_problem(path)
        if problem:
            raise ModelLoadError(problem)

        base_name = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        length = _sequence_length(path, fallback=_sequence_length(Path(base_name)))
        base, tokenizer = FastLanguageModel.from_pretrained(base_name, load_in_4bit=load_in_4bit,
                                                            max_seq_length=length)
        if (path / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
        loaded = PeftModel.from_pretrained(base, path)
        return FastLanguageModel.for_inference(loaded), tokenizer
    loaded, tokenizer = FastLanguageModel.from_pretrained(model, load_in_4bit=load_in_4bit,
                                                          max_seq_length=_sequence_length(path))
    return FastLanguageModel.for_inference(loaded), tokenizer
