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
    chat_template: str | None = None  # when it differs from the family's default template


def _models(family: str, *rows) -> list[KnownModel]:
    """Rows of (name, 4-bit twin[, chat template]) for one family."""
    return [KnownModel(row[0], family, *row[1:]) for row in rows]


_KNOWN: list[KnownModel] = [
    *_models(
        "llama",
        ("meta-llama/Llama-2-7b-hf", "unsloth/llama-2-7b-bnb-4bit", "llama-2"),
        ("meta-llama/Llama-2-7b-chat-hf", "unsloth/llama-2-7b-chat-bnb-4bit", "llama-2"),
        ("meta-llama/Llama-2-13b-chat-hf", "unsloth/llama-2-13b-chat-bnb-4bit", "llama-2"),
        ("meta-llama/Meta-Llama-3-8B", "unsloth/llama-3-8b-bnb-4bit", "llama-3"),
        ("meta-llama/Meta-Llama-3-8B-Instruct", "unsloth/llama-3-8b-Instruct-bnb-4bit", "llama-3"),
        ("meta-llama/Llama-3.1-8B", "unsloth/Meta-Llama-3.1-8B-bnb-4bit"),
        ("meta-llama/Llama-3.1-8B-Instruct", "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit"),
        ("meta-llama/Llama-3.1-70B-Instruct", "unsloth/Meta-Llama-3.1-70B-Instruct-bnb-4bit"),
        ("meta-llama/Llama-3.2-1B", "unsloth/Llama-3.2-1B-bnb-4bit"),
        ("meta-llama/Llama-3.2-1B-Instruct", "unsloth/Llama-3.2-1B-Instruct-bnb-4bit"),
        ("meta-llama/Llama-3.2-3B", "unsloth/Llama-3.2-3B-bnb-4bit"),
        ("meta-llama/Llama-3.2-3B-Instruct", "unsloth/Llama-3.2-3B-Instruct-bnb-4bit"),
        ("meta-llama/Llama-3.3-70B-Instruct", "unsloth/Llama-3.3-70B-Instruct-bnb-4bit"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "unsloth/SmolLM2-135M-Instruct-bnb-4bit", "smollm2"),
        ("HuggingFaceTB/SmolLM2-360M-Instruct", "unsloth/SmolLM2-360M-Instruct-bnb-4bit", "smollm2"),
        ("HuggingFaceTB/SmolLM2-1.7B-Instruct", "unsloth/SmolLM2-1.7B-Instruct-bnb-4bit", "smollm2"),
        ("tiiuae/Falcon3-7B-Instruct", None, "falcon-3"),
    ),
    *_models(
        "mistral",
        ("mistralai/Mistral-7B-v0.3", "unsloth/mistral-7b-v0.3-bnb-4bit"),
        ("mistralai/Mistral-7B-Instruct-v0.3", "unsloth/mistral-7b-instruct-v0.3-bnb-4bit"),
        ("mistralai/Mistral-Nemo-Instruct-2407", "unsloth/Mistral-Nemo-Instruct-2407-bnb-4bit", "mistral-tekken"),
        ("mistralai/Mistral-Small-Instruct-2409", "unsloth/Mistral-Small-Instruct-2409-bnb-4bit"),
        ("mistralai/Mistral-Small-24B-Instruct-2501", "unsloth/Mistral-Small-24B-Instruct-2501-bnb-4bit", "mistral-v7-tekken"),
    ),
    *_models(
        "qwen2",
        ("Qwen/Qwen2-7B-Instruct", "unsloth/Qwen2-7B-Instruct-bnb-4bit", "qwen-2"),
        ("Qwen/Qwen2.5-0.5B-Instruct", "unsloth/Qwen2.5-0.5B-Instruct-bnb-4bit"),
        ("Qwen/Qwen2.5-1.5B-Instruct", "unsloth/Qwen2.5-1.5B-Instruct-bnb-4bit"),
        ("Qwen/Qwen2.5-7B", "unsloth/Qwen2.5-7B-bnb-4bit"),
        ("Qwen/Qwen2.5-7B-Instruct", "unsloth/Qwen2.5-7B-Instruct-bnb-4bit"),
    ),
    *_models(
        "qwen3",
        ("Qwen/Qwen3-0.6B", "unsloth/Qwen3-0.6B-bnb-4bit"),
        ("Qwen/Qwen3-4B", "unsloth/Qwen3-4B-bnb-4bit"),
        ("Qwen/Qwen3-8B", "unsloth/Qwen3-8B-bnb-4bit"),
        ("Qwen/Qwen3-14B", "unsloth/Qwen3-14B-bnb-4bit"),
    ),
    *_models(
        "gemma",
        ("google/gemma-2b", "unsloth/gemma-2b-bnb-4bit"),
        ("google/gemma-7b-it", "unsloth/gemma-7b-it-bnb-4bit"),
    ),
    *_models(
        "gemma2",
        ("google/gemma-2-2b-it", "unsloth/gemma-2-2b-it-bnb-4bit"),
        ("google/gemma-2-9b", "unsloth/gemma-2-9b-bnb-4bit"),
        ("google/gemma-2-9b-it", "unsloth/gemma-2-9b-it-bnb-4bit"),
    ),
    *_models(
        "gemma3",
        ("google/gemma-3-270m", None),
        ("google/gemma-3-270m-it", "unsloth/gemma-3-270m-it-bnb-4bit"),
        ("google/gemma-3-1b-it", "unsloth/gemma-3-1b-it-bnb-4bit"),
    ),
    *_models(
        "phi3",
        ("microsoft/Phi-3-mini-4k-instruct", "unsloth/Phi-3-mini-4k-instruct-bnb-4bit"),
        ("microsoft/Phi-3.5-mini-instruct", "unsloth/Phi-3.5-mini-instruct-bnb-4bit", "phi-3.5"),
        ("microsoft/phi-4", "unsloth/phi-4-bnb-4bit", "phi-4"),
        ("microsoft/Phi-4-mini-instruct", "unsloth/Phi-4-mini-instruct-bnb-4bit", "phi-4-mini"),
    ),
    *_models(
        "granite",
        ("ibm-granite/granite-3.1-2b-instruct", None),
        ("ibm-granite/granite-3.1-8b-instruct", None),
        ("ibm-granite/granite-3.3-8b-instruct", None),
    ),
    *_models(
        "cohere",
        ("CohereForAI/c4ai-command-r-v01", None),
        ("CohereForAI/aya-23-8B", None),
    ),
    *_models(
        "falcon",
        ("tiiuae/falcon-7b", None),
        ("tiiuae/falcon-7b-instruct", None),
        ("tiiuae/falcon-11B", None),
    ),
    *_models(
        "stablelm",
        ("stabilityai/stablelm-2-1_6b", None),
        ("stabilityai/stablelm-2-1_6b-chat", None),
        ("stabilityai/stablelm-2-12b-chat", None),
    ),
    *_models(
        "starcoder2",
        ("bigcode/starcoder2-3b", None),
        ("bigcode/starcoder2-7b", None),
        ("bigcode/starcoder2-15b-instruct-v0.1", None),
    ),
    # Mixtures of experts: no 4-bit twins. Pre-quantised MoE checkpoints store experts in layouts
    # tuneforge's NF4 experts do not read; a 4-bit load quantises the stacked experts itself
    # (models.moe). gpt-oss ships MXFP4 experts, which transformers dequantises on load.
    *_models(
        "qwen3_moe",
        ("Qwen/Qwen3-30B-A3B", None),
        ("Qwen/Qwen3-30B-A3B-Instruct-2507", None),
        ("Qwen/Qwen3-235B-A22B", None),
    ),
    *_models(
        "gpt_oss",
        ("openai/gpt-oss-20b", None),
        ("openai/gpt-oss-120b", None),
    ),
    *_models(
        "mixtral",
        ("mistralai/Mixtral-8x7B-v0.1", None),
        ("mistralai/Mixtral-8x7B-Instruct-v0.1", None),
        ("mistralai/Mixtral-8x22B-Instruct-v0.1", None, "mistral-v3"),
    ),
    *_models(
        "olmo2",
        ("allenai/OLMo-2-0425-1B-Instruct", None),
        ("allenai/OLMo-2-1124-7B-Instruct", None),
        ("allenai/OLMo-2-1124-13B-Instruct", None),
    ),
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


def chat_template_for(name: str) -> str | None:
    """The chat template a known model uses (its own, else its family's); None for unknown names."""
    model = known_model(name)
    if model is None:
        return None
    if model.chat_template:
        return model.chat_template
    from tuneforge.models.families import get_family

    return get_family(model.family).chat_template


def resolve_name(name: str, load_in_4bit: bool) -> str:
    """The Hub name to download for `name`: the NF4 twin for 4-bit loads, else the original."""
    model = known_model(name)
    if model is None:
        return name
    if load_in_4bit and model.bnb_4bit:
        return model.bnb_4bit
    return model.name
