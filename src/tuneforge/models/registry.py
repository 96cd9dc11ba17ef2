"""Known model names: the 16-bit original, its pre-quantised 4-bit twin, and the family.

Users type either name; `resolve_name` picks the one that fits how they load it (a 4-bit twin
saves the download and the quantisation time when `load_in_4bit=True`; the 16-bit original when
they train in 16 bits). Unknown names pass through untouched: the family then comes from the
config's `model_type`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KnownModel:
    name: str  # the original 16-bit checkpoint on the Hub
    family: str  # key in tuneforge.models.families
    bnb_4bit: str | None = None  # a pre-quantised NF4 twin, when one is published


_KNOWN: list[KnownModel] = [
    KnownModel("meta-llama/Llama-2-7b-hf", "llama", "unsloth/llama-2-7b-bnb-4bit"),
    KnownModel("meta-llama/Llama-2-7b-chat-hf", "llama", "unsloth/llama-2-7b-chat-bnb-4bit"),
    KnownModel("meta-llama/Meta-Llama-3-8B", "llama", "unsloth/llama-3-8b-bnb-4bit"),
    KnownModel("meta-llama/Meta-Llama-3-8B-Instruct", "llama", "unsloth/llama-3-8b-Instruct-bnb-4bit"),
    KnownModel("meta-llama/Llama-3.1-8B", "llama", "unsloth/Meta-Llama-3.1-8B-bnb-4bit"),
    KnownModel("meta-llama/Llama-3.1-8B-Instruct", "llama", "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit"),
    KnownModel("meta-llama/Llama-3.1-70B-Instruct", "llama", "unsloth/Meta-Llama-3.1-70B-Instruct-bnb-4bit"),
    KnownModel("meta-llama/Llama-3.2-1B", "llama", "unsloth/Llama-3.2-1B-bnb-4bit"),
    KnownModel("meta-llama/Llama-3.2-1B-Instruct", "llama", "unsloth/Llama-3.2-1B-Instruct-bnb-4bit"),
    KnownModel("meta-llama/Llama-3.2-3B", "llama", "unsloth/Llama-3.2-3B-bnb-4bit"),
    KnownModel("meta-llama/Llama-3.2-3B-Instruct", "llama", "unsloth/Llama-3.2-3B-Instruct-bnb-4bit"),
    KnownModel("meta-llama/Llama-3.3-70B-Instruct", "llama", "unsloth/Llama-3.3-70B-Instruct-bnb-4bit"),
    KnownModel("HuggingFaceTB/SmolLM2-135M-Instruct", "llama", "unsloth/SmolLM2-135M-Instruct-bnb-4bit"),
    KnownModel("HuggingFaceTB/SmolLM2-360M-Instruct", "llama", "unsloth/SmolLM2-360M-Instruct-bnb-4bit"),
    KnownModel("HuggingFaceTB/SmolLM2-1.7B-Instruct", "llama", "unsloth/SmolLM2-1.7B-Instruct-bnb-4bit"),
    KnownModel("mistralai/Mistral-7B-v0.3", "mistral", "unsloth/mistral-7b-v0.3-bnb-4bit"),
    KnownModel("mistralai/Mistral-7B-Instruct-v0.3", "mistral", "unsloth/mistral-7b-instruct-v0.3-bnb-4bit"),
    KnownModel("mistralai/Mistral-Nemo-Instruct-2407", "mistral", "unsloth/Mistral-Nemo-Instruct-2407-bnb-4bit"),
    KnownModel("mistralai/Mistral-Small-Instruct-2409", "mistral", "unsloth/Mistral-Small-Instruct-2409-bnb-4bit"),
    KnownModel("Qwen/Qwen2.5-0.5B-Instruct", "qwen2", "unsloth/Qwen2.5-0.5B-Instruct-bnb-4bit"),
    KnownModel("Qwen/Qwen2.5-1.5B-Instruct", "qwen2", "unsloth/Qwen2.5-1.5B-Instruct-bnb-4bit"),
    KnownModel("Qwen/Qwen2.5-7B", "qwen2", "unsloth/Qwen2.5-7B-bnb-4bit"),
    KnownModel("Qwen/Qwen2.5-7B-Instruct", "qwen2", "unsloth/Qwen2.5-7B-Instruct-bnb-4bit"),
    KnownModel("Qwen/Qwen3-0.6B", "qwen3", "unsloth/Qwen3-0.6B-bnb-4bit"),
    KnownModel("Qwen/Qwen3-8B", "qwen3", "unsloth/Qwen3-8B-bnb-4bit"),
    KnownModel("google/gemma-2b", "gemma", "unsloth/gemma-2b-bnb-4bit"),
    KnownModel("google/gemma-7b-it", "gemma", "unsloth/gemma-7b-it-bnb-4bit"),
    KnownModel("google/gemma-2-9b", "gemma2", "unsloth/gemma-2-9b-bnb-4bit"),
    KnownModel("google/gemma-2-9b-it", "gemma2", "unsloth/gemma-2-9b-it-bnb-4bit"),
    KnownModel("google/gemma-3-270m-it", "gemma3", "unsloth/gemma-3-270m-it-bnb-4bit"),
    KnownModel("google/gemma-3-1b-it", "gemma3", "unsloth/gemma-3-1b-it-bnb-4bit"),
    KnownModel("microsoft/Phi-3-mini-4k-instruct", "phi3", "unsloth/Phi-3-mini-4k-instruct-bnb-4bit"),
    KnownModel("microsoft/Phi-3.5-mini-instruct", "phi3", "unsloth/Phi-3.5-mini-instruct-bnb-4bit"),
    KnownModel("microsoft/phi-4", "phi3", "unsloth/phi-4-bnb-4bit"),
]

_BY_NAME: dict[str, KnownModel] = {}
for _model in _KNOWN:
    _BY_NAME[_model.name.lower()] = _model
    if _model.bnb_4bit:
        _BY_NAME[_model.bnb_4bit.lower()] = _model


def known_model(name: str) -> KnownModel | None:
    return _BY_NAME.get(name.lower())


def known_models() -> list[KnownModel]:
    return list(_KNOWN)


def resolve_name(name: str, load_in_4bit: bool) -> str:
    """The Hub name to download for `name`: the NF4 twin for 4-bit loads, else the original."""
    model = known_model(name)
    if model is None:
        return name
    if load_in_4bit and model.bnb_4bit:
        return model.bnb_4bit
    return model.name
