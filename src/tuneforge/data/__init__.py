"""Data preparation: a user's dataset -> token ids with labels, exact to the token.

    from tuneforge.data import prepare_dataset
    dataset = prepare_dataset("train.jsonl", tokenizer, chat_template="llama-3.1", max_seq_length=2048)

Modules: loading (files, folders, Hub, datasets objects), formats (alpaca / sharegpt / messages /
prompt-completion / text), templates (chat formats as data, get_chat_template), masking (labels on
assistant tokens only, train_on_responses_only), raw_text (windows of raw text), packing
(padding-free rows and their collator), prepare (the whole chain). Names are imported lazily so
that `import tuneforge.data` stays cheap.
"""

_PUBLIC = {
    "prepare_dataset": "tuneforge.data.prepare",
    "apply_overflow": "tuneforge.data.prepare",
    "load_records": "tuneforge.data.loading",
    "to_conversations": "tuneforge.data.formats",
    "standardize_sharegpt": "tuneforge.data.formats",
    "get_chat_template": "tuneforge.data.templates",
    "list_chat_templates": "tuneforge.data.templates",
    "tokenize_conversation": "tuneforge.data.masking",
    "train_on_responses_only": "tuneforge.data.masking",
    "RawTextDataLoader": "tuneforge.data.raw_text",
    "PaddingFreeCollator": "tuneforge.data.packing",
    "pack_dataset": "tuneforge.data.packing",
    "DataError": "tuneforge.data.errors",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'tuneforge.data' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value
