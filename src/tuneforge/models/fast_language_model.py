"""`FastLanguageModel`: the Unsloth-compatible entry point (same names, same arguments)."""

from __future__ import annotations

import torch

from tuneforge.lora.inject import get_peft_model
from tuneforge.models.loader import load_model


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
        **kwargs,
    ):
        """Load `model_name` and its tokenizer; returns (model, tokenizer).

        model_name: a shipped model ("tuneforge/smollm2-135m-instruct"), a local HF folder, or a Hub
            id (needs the network; known ids map to their pre-quantised 4-bit twins).
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
        model, tokenizer = load_model(
            model_name,
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
            use_kernels=use_kernels,
            **kwargs,
        )
        if use_gradient_checkpointing is not None:
            # Unsloth accepts it here too; it takes effect in get_peft_model.
            model.tuneforge_gradient_checkpointing = use_gradient_checkpointing
        return model, tokenizer

    @staticmethod
    def get_peft_model(model, r: int = 16, target_modules=None, lora_alpha: float = 16, lora_dropout: float = 0.0,
                       bias: str = "none", use_gradient_checkpointing=None, random_state: int = 3407,
                       use_rslora: bool = False, modules_to_save=None, **kwargs):
        """Add LoRA adapters (see tuneforge.lora.inject.get_peft_model)."""
        if use_gradient_checkpointing is None:
            use_gradient_checkpointing = getattr(model, "tuneforge_gradient_checkpointing", "unsloth")
        return get_peft_model(
            model, r=r, target_modules=target_modules, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            bias=bias, use_gradient_checkpointing=use_gradient_checkpointing, random_state=random_state,
            use_rslora=use_rslora, modules_to_save=modules_to_save, **kwargs,
        )

    @staticmethod
    def for_inference(model):
        """Eval mode, KV cache on, gradient checkpointing off, and a fast `model.generate`.

        `generate` then runs a static KV cache with decode steps replayed from a CUDA graph
        (eagerly on the CPU) when it supports the call, else transformers' own generate with
        one log line saying why (see tuneforge.inference.generate).
        """
        from tuneforge.inference import enable_fast_generate

        model.eval()
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.config.use_cache = True
        if getattr(base, "is_gradient_checkpointing", False):
            base.gradient_checkpointing_disable()
            base.tuneforge_resume_checkpointing = True
        return enable_fast_generate(model)

    @staticmethod
    def for_training(model, use_gradient_checkpointing=True):
        """Train mode, KV cache off, checkpointing back on if for_inference turned it off; `generate`
        is transformers' again and the inference cache and graph are released."""
        from tuneforge.inference import disable_fast_generate

        disable_fast_generate(model)
        model.train()
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.config.use_cache = False
        if getattr(base, "tuneforge_resume_checkpointing", False) and use_gradient_checkpointing:
            from tuneforge.train.checkpointing import enable_gradient_checkpointing

            enable_gradient_checkpointing(model, getattr(base, "tuneforge_gradient_checkpointing", True))
            base.tuneforge_resume_checkpointing = False
        return model


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
