"""tuneforge: fast, memory-lean LoRA / QLoRA fine-tuning.

The public names follow Unsloth's so that switching is a change of import. They are resolved
lazily: `import tuneforge` stays cheap (the CLI's `--help` does not import torch), and it patches
nothing: trl's SFTTrainer stays trl's. Notebooks import `SFTTrainer, SFTConfig` from tuneforge
instead of trl (README, "Unsloth's notebooks").
"""

__version__ = "0.1.0"

_PUBLIC = {
    "FastLanguageModel": ("tuneforge.fast_language_model", "FastLanguageModel"),
    "FastModel": ("tuneforge.fast_language_model", "FastLanguageModel"),
    "is_bfloat16_supported": ("tuneforge.device", "is_bfloat16_supported"),
    "SFTTrainer": ("tuneforge.train.trainer", "SFTTrainer"),
    "SFTConfig": ("tuneforge.train.trainer", "SFTConfig"),
    "get_chat_template": ("tuneforge.data.templates", "get_chat_template"),
    "standardize_sharegpt": ("tuneforge.data.formats", "standardize_sharegpt"),
    "train_on_responses_only": ("tuneforge.data.masking", "train_on_responses_only"),
    "standardize_data_formats": ("tuneforge.chat_templates", "standardize_data_formats"),
    "to_sharegpt": ("tuneforge.chat_templates", "to_sharegpt"),
    "apply_chat_template": ("tuneforge.chat_templates", "apply_chat_template"),
    # Unsloth's continued-pretraining notebooks: the same trainer and config (embedding_learning_rate included).
    "UnslothTrainer": ("tuneforge.train.trainer", "SFTTrainer"),
    "UnslothTrainingArguments": ("tuneforge.train.trainer", "SFTConfig"),
    "unsloth_train": ("tuneforge.train.trainer", "unsloth_train"),
}

# Unsloth names tuneforge does not provide, and what to do instead (an ImportError, not a bare
# AttributeError, so that `from tuneforge import FastVisionModel` says why).
_NOT_PROVIDED = {
    "FastVisionModel": "tuneforge trains text models only; vision and audio models are not supported",
    "UnslothVisionDataCollator": "tuneforge trains text models only; vision and audio models are not supported",
    "PatchFastRL": "tuneforge does not patch trl's RL trainers (GRPO, DPO, ...); use trl's trainers directly",
    "PatchDPOTrainer": "tuneforge does not patch trl's RL trainers (GRPO, DPO, ...); use trl's trainers directly",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _NOT_PROVIDED:
        raise ImportError(f"tuneforge.{name} (Unsloth) is not provided: {_NOT_PROVIDED[name]}")
    if name not in _PUBLIC:
        raise AttributeError(f"module 'tuneforge' has no attribute {name!r}")
    import importlib

    module_name, attribute = _PUBLIC[name]
    value = getattr(importlib.import_module(module_name), attribute)
    globals()[name] = value
    return value
