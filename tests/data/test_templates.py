"""Every chat format renders the fixed conversation exactly as its family publishes it.

The expected strings are written by hand from each family's published format (model cards,
tokenizer_config.json templates, mistral-common's tokenization docs, FastChat for Vicuna); the
table's `source` field names the document. Each format is checked with and without the generation
prompt, for its end-of-turn token, and for the exact text the assistant writes (what gets labels).
"""

from types import SimpleNamespace

import pytest

from data_samples import CONVERSATION
from tuneforge.data.errors import DataError
from tuneforge.data.templates import (
    CHAT_TEMPLATES,
    get_chat_template,
    has_generation_tags,
    list_chat_templates,
    render,
    resolve_template,
    strip_generation_tags,
)
from tuneforge.data.masking import assistant_spans

# The conversation, for reading the strings below:
#   system "You are a helpful assistant." | user "Hello!" | assistant "Hi, how can I help?"
#   user "What is 2+2?" | assistant "2+2 equals 4."
# PROMPT is the conversation up to the second user turn, rendered with add_generation_prompt=True.
# render() is given bos_token="<s>" and eos_token="</s>" (only alpaca writes the tokenizer's EOS).

CHATML = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nHello!<|im_end|>\n"
    "<|im_start|>assistant\nHi, how can I help?<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
)
CHATML_FULL = CHATML + "<|im_start|>assistant\n2+2 equals 4.<|im_end|>\n"
CHATML_PROMPT = CHATML + "<|im_start|>assistant\n"
CHATML_REPLIES = ["Hi, how can I help?<|im_end|>", "2+2 equals 4.<|im_end|>"]

LLAMA3_BODY = (
    "<|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHi, how can I help?<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
DEEPSEEK3 = (
    "<｜begin▁of▁sentence｜>You are a helpful assistant."
    "<｜User｜>Hello!<｜Assistant｜>Hi, how can I help?<｜end▁of▁sentence｜>"
    "<｜User｜>What is 2+2?<｜Assistant｜>"
)
PHI3 = (
    "<|system|>\nYou are a helpful assistant.<|end|>\n"
    "<|user|>\nHello!<|end|>\n"
    "<|assistant|>\nHi, how can I help?<|end|>\n"
    "<|user|>\nWhat is 2+2?<|end|>\n"
    "<|assistant|>\n"
)
GEMMA4 = (
    "<|turn>system\nYou are a helpful assistant.<turn|>\n<|turn>user\nHello!<turn|>\n"
    "<|turn>model\nHi, how can I help?<turn|>\n<|turn>user\nWhat is 2+2?<turn|>\n"
)
GPT_OSS = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06"
    "\n\nReasoning: medium\n\n# Valid channels: analysis, commentary, final. Channel must be included for every "
    "message.<|end|><|start|>developer<|message|># Instructions\n\nYou are a helpful assistant.<|end|>"
    "<|start|>user<|message|>Hello!<|end|><|start|>assistant<|channel|>final<|message|>Hi, how can I help?<|return|>"
    "<|start|>user<|message|>What is 2+2?<|end|>"
)

# name: (full conversation, PROMPT, end-of-turn token, the two replies as the assistant writes them)
EXPECTED = {
    "chatml": (CHATML_FULL, CHATML_PROMPT, "<|im_end|>", CHATML_REPLIES),
    "qwen-2": (CHATML_FULL, CHATML_PROMPT, "<|im_end|>", CHATML_REPLIES),
    "qwen-2.5": (CHATML_FULL, CHATML_PROMPT, "<|im_end|>", CHATML_REPLIES),
    "smollm2": (CHATML_FULL, CHATML_PROMPT, "<|im_end|>", CHATML_REPLIES),
    "internlm2": ("<s>" + CHATML_FULL, "<s>" + CHATML_PROMPT, "<|im_end|>", CHATML_REPLIES),
    "gemma-chatml": ("<bos>" + CHATML_FULL, "<bos>" + CHATML_PROMPT, "<|im_end|>", CHATML_REPLIES),
    "qwen-3": (
        CHATML + "<|im_start|>assistant\n<think>\n\n</think>\n\n2+2 equals 4.<|im_end|>\n",
        CHATML_PROMPT,
        "<|im_end|>",
        ["Hi, how can I help?<|im_end|>", "<think>\n\n</think>\n\n2+2 equals 4.<|im_end|>"],
    ),
    "qwen3-instruct": (CHATML_FULL, CHATML_PROMPT, "<|im_end|>", CHATML_REPLIES),
    "qwen3-thinking": (
        CHATML + "<|im_start|>assistant\n<think>\n\n</think>\n\n2+2 equals 4.<|im_end|>\n",
        CHATML_PROMPT + "<think>\n",
        "<|im_end|>",
        ["Hi, how can I help?<|im_end|>", "<think>\n\n</think>\n\n2+2 equals 4.<|im_end|>"],
    ),
    "lfm-2": ("<s>" + CHATML_FULL, "<s>" + CHATML_PROMPT, "<|im_end|>", CHATML_REPLIES),
    "gemma-4": (
        GEMMA4 + "<|turn>model\n2+2 equals 4.<turn|>\n", GEMMA4 + "<|turn>model\n", "<turn|>",
        ["Hi, how can I help?<turn|>", "2+2 equals 4.<turn|>"],
    ),
    "gemma-4-thinking": (
        GEMMA4 + "<|turn>model\n2+2 equals 4.<turn|>\n", GEMMA4 + "<|turn>model\n<|channel>thought\n<channel|>",
        "<turn|>", ["Hi, how can I help?<turn|>", "2+2 equals 4.<turn|>"],
    ),
    "vicuna-old": (
        "<s>You are a helpful assistant.\n### Human: Hello!\n### Assistant: Hi, how can I help?</s>\n"
        "### Human: What is 2+2?\n### Assistant: 2+2 equals 4.</s>\n",
        "<s>You are a helpful assistant.\n### Human: Hello!\n### Assistant: Hi, how can I help?</s>\n"
        "### Human: What is 2+2?\n### Assistant:",
        "</s>",
        [" Hi, how can I help?</s>", " 2+2 equals 4.</s>"],
    ),
    "unsloth": (
        "<s>You are a helpful assistant.\n>>> User: Hello!\n>>> Assistant: Hi, how can I help?</s>\n"
        ">>> User: What is 2+2?\n>>> Assistant: 2+2 equals 4.</s>\n",
        "<s>You are a helpful assistant.\n>>> User: Hello!\n>>> Assistant: Hi, how can I help?</s>\n"
        ">>> User: What is 2+2?\n>>> Assistant:",
        "{eos_token}",
        [" Hi, how can I help?</s>", " 2+2 equals 4.</s>"],
    ),
    "gpt-oss": (
        GPT_OSS + "<|start|>assistant<|channel|>final<|message|>2+2 equals 4.<|return|>",
        GPT_OSS + "<|start|>assistant",
        "<|return|>",
        ["<|channel|>final<|message|>Hi, how can I help?<|return|>", "<|channel|>final<|message|>2+2 equals 4.<|return|>"],
    ),
    "llama-2": (
        "<s>[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nHello! [/INST] Hi, how can I help? </s>"
        "<s>[INST] What is 2+2? [/INST] 2+2 equals 4. </s>",
        "<s>[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nHello! [/INST] Hi, how can I help? </s>"
        "<s>[INST] What is 2+2? [/INST]",
        "</s>",
        [" Hi, how can I help? </s>", " 2+2 equals 4. </s>"],
    ),
    "llama-3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
        + LLAMA3_BODY + "2+2 equals 4.<|eot_id|>",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
        + LLAMA3_BODY,
        "<|eot_id|>",
        ["Hi, how can I help?<|eot_id|>", "2+2 equals 4.<|eot_id|>"],
    ),
    "llama-3.1": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nYou are a helpful assistant.<|eot_id|>"
        + LLAMA3_BODY + "2+2 equals 4.<|eot_id|>",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nYou are a helpful assistant.<|eot_id|>"
        + LLAMA3_BODY,
        "<|eot_id|>",
        ["Hi, how can I help?<|eot_id|>", "2+2 equals 4.<|eot_id|>"],
    ),
    "llama-4": (
        "<|begin_of_text|><|header_start|>system<|header_end|>\n\nYou are a helpful assistant.<|eot|>"
        "<|header_start|>user<|header_end|>\n\nHello!<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\nHi, how can I help?<|eot|>"
        "<|header_start|>user<|header_end|>\n\nWhat is 2+2?<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n2+2 equals 4.<|eot|>",
        "<|begin_of_text|><|header_start|>system<|header_end|>\n\nYou are a helpful assistant.<|eot|>"
        "<|header_start|>user<|header_end|>\n\nHello!<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\nHi, how can I help?<|eot|>"
        "<|header_start|>user<|header_end|>\n\nWhat is 2+2?<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n",
        "<|eot|>",
        ["Hi, how can I help?<|eot|>", "2+2 equals 4.<|eot|>"],
    ),
    "mistral-v1": (
        "<s> [INST] You are a helpful assistant.\n\nHello! [/INST] Hi, how can I help?</s>"
        " [INST] What is 2+2? [/INST] 2+2 equals 4.</s>",
        "<s> [INST] You are a helpful assistant.\n\nHello! [/INST] Hi, how can I help?</s> [INST] What is 2+2? [/INST]",
        "</s>",
        [" Hi, how can I help?</s>", " 2+2 equals 4.</s>"],
    ),
    "mistral-v3": (
        "<s>[INST] Hello![/INST] Hi, how can I help?</s>"
        "[INST] You are a helpful assistant.\n\nWhat is 2+2?[/INST] 2+2 equals 4.</s>",
        "<s>[INST] Hello![/INST] Hi, how can I help?</s>[INST] You are a helpful assistant.\n\nWhat is 2+2?[/INST]",
        "</s>",
        [" Hi, how can I help?</s>", " 2+2 equals 4.</s>"],
    ),
    "mistral-tekken": (
        "<s>[INST]Hello![/INST]Hi, how can I help?</s>[INST]You are a helpful assistant.\n\nWhat is 2+2?[/INST]"
        "2+2 equals 4.</s>",
        "<s>[INST]Hello![/INST]Hi, how can I help?</s>[INST]You are a helpful assistant.\n\nWhat is 2+2?[/INST]",
        "</s>",
        ["Hi, how can I help?</s>", "2+2 equals 4.</s>"],
    ),
    "mistral-v7": (
        "<s>[SYSTEM_PROMPT] You are a helpful assistant.[/SYSTEM_PROMPT][INST] Hello![/INST] Hi, how can I help?</s>"
        "[INST] What is 2+2?[/INST] 2+2 equals 4.</s>",
        "<s>[SYSTEM_PROMPT] You are a helpful assistant.[/SYSTEM_PROMPT][INST] Hello![/INST] Hi, how can I help?</s>"
        "[INST] What is 2+2?[/INST]",
        "</s>",
        [" Hi, how can I help?</s>", " 2+2 equals 4.</s>"],
    ),
    "mistral-v7-tekken": (
        "<s>[SYSTEM_PROMPT]You are a helpful assistant.[/SYSTEM_PROMPT][INST]Hello![/INST]Hi, how can I help?</s>"
        "[INST]What is 2+2?[/INST]2+2 equals 4.</s>",
        "<s>[SYSTEM_PROMPT]You are a helpful assistant.[/SYSTEM_PROMPT][INST]Hello![/INST]Hi, how can I help?</s>"
        "[INST]What is 2+2?[/INST]",
        "</s>",
        ["Hi, how can I help?</s>", "2+2 equals 4.</s>"],
    ),
    "gemma": (
        "<bos><start_of_turn>user\nYou are a helpful assistant.\n\nHello!<end_of_turn>\n"
        "<start_of_turn>model\nHi, how can I help?<end_of_turn>\n"
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n2+2 equals 4.<end_of_turn>\n",
        "<bos><start_of_turn>user\nYou are a helpful assistant.\n\nHello!<end_of_turn>\n"
        "<start_of_turn>model\nHi, how can I help?<end_of_turn>\n"
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n",
        "<end_of_turn>",
        ["Hi, how can I help?<end_of_turn>", "2+2 equals 4.<end_of_turn>"],
    ),
    "phi-3": (PHI3 + "2+2 equals 4.<|end|>\n", PHI3, "<|end|>", ["Hi, how can I help?<|end|>", "2+2 equals 4.<|end|>"]),
    "phi-3.5": (
        PHI3 + "2+2 equals 4.<|end|>\n<|endoftext|>", PHI3, "<|end|>",
        ["Hi, how can I help?<|end|>", "2+2 equals 4.<|end|>"],
    ),
    "phi-4": (
        "<|im_start|>system<|im_sep|>You are a helpful assistant.<|im_end|>"
        "<|im_start|>user<|im_sep|>Hello!<|im_end|>"
        "<|im_start|>assistant<|im_sep|>Hi, how can I help?<|im_end|>"
        "<|im_start|>user<|im_sep|>What is 2+2?<|im_end|>"
        "<|im_start|>assistant<|im_sep|>2+2 equals 4.<|im_end|>",
        "<|im_start|>system<|im_sep|>You are a helpful assistant.<|im_end|>"
        "<|im_start|>user<|im_sep|>Hello!<|im_end|>"
        "<|im_start|>assistant<|im_sep|>Hi, how can I help?<|im_end|>"
        "<|im_start|>user<|im_sep|>What is 2+2?<|im_end|>"
        "<|im_start|>assistant<|im_sep|>",
        "<|im_end|>",
        ["Hi, how can I help?<|im_end|>", "2+2 equals 4.<|im_end|>"],
    ),
    "phi-4-mini": (
        "<|system|>You are a helpful assistant.<|end|><|user|>Hello!<|end|><|assistant|>Hi, how can I help?<|end|>"
        "<|user|>What is 2+2?<|end|><|assistant|>2+2 equals 4.<|end|><|endoftext|>",
        "<|system|>You are a helpful assistant.<|end|><|user|>Hello!<|end|><|assistant|>Hi, how can I help?<|end|>"
        "<|user|>What is 2+2?<|end|><|assistant|>",
        "<|end|>",
        ["Hi, how can I help?<|end|>", "2+2 equals 4.<|end|>"],
    ),
    "zephyr": (
        "<|system|>\nYou are a helpful assistant.</s>\n<|user|>\nHello!</s>\n<|assistant|>\nHi, how can I help?</s>\n"
        "<|user|>\nWhat is 2+2?</s>\n<|assistant|>\n2+2 equals 4.</s>\n",
        "<|system|>\nYou are a helpful assistant.</s>\n<|user|>\nHello!</s>\n<|assistant|>\nHi, how can I help?</s>\n"
        "<|user|>\nWhat is 2+2?</s>\n<|assistant|>\n",
        "</s>",
        ["Hi, how can I help?</s>", "2+2 equals 4.</s>"],
    ),
    "vicuna": (
        "<s>You are a helpful assistant. USER: Hello! ASSISTANT: Hi, how can I help?</s>"
        "USER: What is 2+2? ASSISTANT: 2+2 equals 4.</s>",
        "<s>You are a helpful assistant. USER: Hello! ASSISTANT: Hi, how can I help?</s>USER: What is 2+2? ASSISTANT:",
        "</s>",
        [" Hi, how can I help?</s>", " 2+2 equals 4.</s>"],
    ),
    "alpaca": (
        "You are a helpful assistant.\n\n### Instruction:\nHello!\n\n### Response:\nHi, how can I help?</s>\n\n"
        "### Instruction:\nWhat is 2+2?\n\n### Response:\n2+2 equals 4.</s>",
        "You are a helpful assistant.\n\n### Instruction:\nHello!\n\n### Response:\nHi, how can I help?</s>\n\n"
        "### Instruction:\nWhat is 2+2?\n\n### Response:\n",
        "{eos_token}",
        ["Hi, how can I help?</s>", "2+2 equals 4.</s>"],
    ),
    "granite": (
        "<|start_of_role|>system<|end_of_role|>You are a helpful assistant.<|end_of_text|>\n"
        "<|start_of_role|>user<|end_of_role|>Hello!<|end_of_text|>\n"
        "<|start_of_role|>assistant<|end_of_role|>Hi, how can I help?<|end_of_text|>\n"
        "<|start_of_role|>user<|end_of_role|>What is 2+2?<|end_of_text|>\n"
        "<|start_of_role|>assistant<|end_of_role|>2+2 equals 4.<|end_of_text|>\n",
        "<|start_of_role|>system<|end_of_role|>You are a helpful assistant.<|end_of_text|>\n"
        "<|start_of_role|>user<|end_of_role|>Hello!<|end_of_text|>\n"
        "<|start_of_role|>assistant<|end_of_role|>Hi, how can I help?<|end_of_text|>\n"
        "<|start_of_role|>user<|end_of_role|>What is 2+2?<|end_of_text|>\n"
        "<|start_of_role|>assistant<|end_of_role|>",
        "<|end_of_text|>",
        ["Hi, how can I help?<|end_of_text|>", "2+2 equals 4.<|end_of_text|>"],
    ),
    "cohere": (
        "<BOS_TOKEN><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>You are a helpful assistant.<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hello!<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Hi, how can I help?<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>What is 2+2?<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>2+2 equals 4.<|END_OF_TURN_TOKEN|>",
        "<BOS_TOKEN><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>You are a helpful assistant.<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hello!<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Hi, how can I help?<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>What is 2+2?<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
        "<|END_OF_TURN_TOKEN|>",
        ["Hi, how can I help?<|END_OF_TURN_TOKEN|>", "2+2 equals 4.<|END_OF_TURN_TOKEN|>"],
    ),
    "falcon-3": (
        "<|system|>\nYou are a helpful assistant.\n<|user|>\nHello!\n<|assistant|>\nHi, how can I help?<|endoftext|>\n"
        "<|user|>\nWhat is 2+2?\n<|assistant|>\n2+2 equals 4.<|endoftext|>",
        "<|system|>\nYou are a helpful assistant.\n<|user|>\nHello!\n<|assistant|>\nHi, how can I help?<|endoftext|>\n"
        "<|user|>\nWhat is 2+2?\n<|assistant|>\n",
        "<|endoftext|>",
        ["Hi, how can I help?<|endoftext|>", "2+2 equals 4.<|endoftext|>"],
    ),
    "deepseek-v2": (
        "<｜begin▁of▁sentence｜>You are a helpful assistant.\n\nUser: Hello!\n\nAssistant: Hi, how can I help?"
        "<｜end▁of▁sentence｜>User: What is 2+2?\n\nAssistant: 2+2 equals 4.<｜end▁of▁sentence｜>",
        "<｜begin▁of▁sentence｜>You are a helpful assistant.\n\nUser: Hello!\n\nAssistant: Hi, how can I help?"
        "<｜end▁of▁sentence｜>User: What is 2+2?\n\nAssistant:",
        "<｜end▁of▁sentence｜>",
        [" Hi, how can I help?<｜end▁of▁sentence｜>", " 2+2 equals 4.<｜end▁of▁sentence｜>"],
    ),
    "deepseek-v3": (
        DEEPSEEK3 + "2+2 equals 4.<｜end▁of▁sentence｜>", DEEPSEEK3, "<｜end▁of▁sentence｜>",
        ["Hi, how can I help?<｜end▁of▁sentence｜>", "2+2 equals 4.<｜end▁of▁sentence｜>"],
    ),
    "deepseek-r1": (
        DEEPSEEK3 + "2+2 equals 4.<｜end▁of▁sentence｜>", DEEPSEEK3 + "<think>\n", "<｜end▁of▁sentence｜>",
        ["Hi, how can I help?<｜end▁of▁sentence｜>", "2+2 equals 4.<｜end▁of▁sentence｜>"],
    ),
    "deepseek-coder": (
        "<｜begin▁of▁sentence｜>You are a helpful assistant.### Instruction:\nHello!\n### Response:\n"
        "Hi, how can I help?\n<|EOT|>\n### Instruction:\nWhat is 2+2?\n### Response:\n2+2 equals 4.\n<|EOT|>\n",
        "<｜begin▁of▁sentence｜>You are a helpful assistant.### Instruction:\nHello!\n### Response:\n"
        "Hi, how can I help?\n<|EOT|>\n### Instruction:\nWhat is 2+2?\n### Response:\n",
        "<|EOT|>",
        ["Hi, how can I help?\n<|EOT|>", "2+2 equals 4.\n<|EOT|>"],
    ),
    "openchat": (
        "<s>GPT4 Correct System: You are a helpful assistant.<|end_of_turn|>GPT4 Correct User: Hello!<|end_of_turn|>"
        "GPT4 Correct Assistant: Hi, how can I help?<|end_of_turn|>GPT4 Correct User: What is 2+2?<|end_of_turn|>"
        "GPT4 Correct Assistant: 2+2 equals 4.<|end_of_turn|>",
        "<s>GPT4 Correct System: You are a helpful assistant.<|end_of_turn|>GPT4 Correct User: Hello!<|end_of_turn|>"
        "GPT4 Correct Assistant: Hi, how can I help?<|end_of_turn|>GPT4 Correct User: What is 2+2?<|end_of_turn|>"
        "GPT4 Correct Assistant:",
        "<|end_of_turn|>",
        [" Hi, how can I help?<|end_of_turn|>", " 2+2 equals 4.<|end_of_turn|>"],
    ),
    "exaone": (
        "[|system|]You are a helpful assistant.[|endofturn|]\n[|user|]Hello!\n[|assistant|]Hi, how can I help?"
        "[|endofturn|]\n[|user|]What is 2+2?\n[|assistant|]2+2 equals 4.[|endofturn|]\n",
        "[|system|]You are a helpful assistant.[|endofturn|]\n[|user|]Hello!\n[|assistant|]Hi, how can I help?"
        "[|endofturn|]\n[|user|]What is 2+2?\n[|assistant|]",
        "[|endofturn|]",
        ["Hi, how can I help?[|endofturn|]", "2+2 equals 4.[|endofturn|]"],
    ),
}


def test_every_format_has_an_expected_rendering():
    assert sorted(EXPECTED) == sorted(list_chat_templates())


def test_the_table_is_large_and_every_name_resolves():
    assert len(list_chat_templates()) >= 30  # distinct formats
    names = list_chat_templates(include_aliases=True)
    assert len(names) >= 40
    for name in names:
        assert resolve_template(name).name in EXPECTED
    # Names users type, with their spelling variations.
    for typed, name in [("llama-3.2", "llama-3.1"), ("Llama_3.3", "llama-3.1"), ("qwen2.5", "qwen-2.5"),
                        ("gemma-3", "gemma"), ("mistral-nemo", "mistral-tekken"), ("starling", "openchat"),
                        ("yi", "chatml"), ("phi-3.5", "phi-3.5"), ("command-r", "cohere")]:
        assert resolve_template(typed).name == name


# Every name Unsloth's get_chat_template accepts (unsloth/chat_templates.py, CHAT_TEMPLATES keys, 2026-08).
UNSLOTH_NAMES = [
    "unsloth", "zephyr", "chatml", "mistral", "llama", "vicuna", "vicuna_old", "vicuna old", "alpaca", "gemma",
    "gemma_chatml", "gemma2", "gemma2_chatml", "llama-3", "llama3", "phi-3", "phi-35", "phi-3.5", "llama-3.1",
    "llama-31", "llama-3.2", "llama-3.3", "llama-32", "llama-33", "qwen-2.5", "qwen-25", "qwen25", "qwen2.5",
    "phi-4", "gemma-3", "gemma3", "qwen-3", "qwen3", "gemma-3n", "gemma3n", "gemma-4", "gemma4", "gemma-4-thinking",
    "gemma4-thinking", "gpt-oss", "gptoss", "qwen3-instruct", "qwen3-thinking", "lfm-2", "lfm-2.5", "starling",
    "yi-chat",
]


@pytest.mark.parametrize("name", UNSLOTH_NAMES)
def test_every_unsloth_template_name_is_accepted(name):
    assert resolve_template(name).name in EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_renders_the_published_format(name):
    full, prompt, _, _ = EXPECTED[name]
    assert render(name, CONVERSATION) == full
    assert render(name, CONVERSATION[:4], add_generation_prompt=True) == prompt


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_end_of_turn_and_the_assistant_text(name):
    """The generation spans are exactly each reply plus its end-of-turn token, and nothing else."""
    full, _, end_of_turn, replies = EXPECTED[name]
    template = resolve_template(name)
    assert template.end_of_turn == end_of_turn
    # Rendering needs only the special tokens' text: the same as render() passes.
    tokens = SimpleNamespace(bos_token="<s>", eos_token="</s>", special_tokens_map={})
    text, spans = assistant_spans(CONVERSATION, tokens, chat_template=name)
    assert text == full
    assert [text[a:b] for a, b in spans] == replies
    eot = "</s>" if end_of_turn == "{eos_token}" else end_of_turn
    assert all(reply.endswith(eot) for reply in replies)


def test_default_system_messages():
    conversation = CONVERSATION[1:3]
    assert render("qwen-2.5", conversation).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello!")
    assert render("qwen-2", conversation).startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert render("chatml", conversation).startswith("<|im_start|>user\nHello!")
    assert render("llama-3.1", conversation).startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello!")
    assert render("vicuna", conversation[:1], add_generation_prompt=True) == (
        "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: Hello! ASSISTANT:")
    assert render("gemma", conversation) == (
        "<bos><start_of_turn>user\nHello!<end_of_turn>\n<start_of_turn>model\nHi, how can I help?<end_of_turn>\n")


def test_text_is_trimmed_where_the_family_trims_it():
    padded = [{"role": "user", "content": "  Hello!\n"}, {"role": "assistant", "content": "\n Hi. "}]
    assert render("llama-3", padded) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHi.<|eot_id|>")
    assert render("chatml", padded) == (
        "<|im_start|>user\n  Hello!\n<|im_end|>\n<|im_start|>assistant\n\n Hi. <|im_end|>\n")


def test_qwen3_thinking():
    reasoning = [{"role": "user", "content": "2+2?"},
                 {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
                 {"role": "user", "content": "and 3+3?"},
                 {"role": "assistant", "content": "<think>\nadd again\n</think>\n\n6"}]
    # Earlier replies lose their reasoning, the last keeps it (Qwen 3's rule).
    assert render("qwen-3", reasoning) == (
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nand 3+3?<|im_end|>\n<|im_start|>assistant\n<think>\nadd again\n</think>\n\n6<|im_end|>\n")
    assert render("qwen-3", reasoning[:1], add_generation_prompt=True, enable_thinking=False) == (
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_unsupported_roles_are_refused_by_the_template():
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="role tool"):
        render("chatml", [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])
    with pytest.raises(TemplateError, match="system turn must come first"):
        render("llama-3", [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])


def test_unknown_template_name_suggests_close_ones():
    with pytest.raises(DataError, match=r"unknown chat template 'lama-3'.*Did you mean: .*llama-3"):
        resolve_template("lama-3")


def test_generation_tags_can_be_stripped_without_changing_the_text():
    from transformers.utils.chat_template_utils import render_jinja_template

    for template in CHAT_TEMPLATES:
        plain = strip_generation_tags(template.jinja())
        assert has_generation_tags(template.jinja()) and not has_generation_tags(plain)
        text, _ = render_jinja_template([CONVERSATION], chat_template=plain, bos_token="<s>", eos_token="</s>")
        assert text[0] == EXPECTED[template.name][0]


# --- get_chat_template on a real tokenizer ------------------------------------------------------


def test_smollm2_table_entry_matches_the_template_the_model_ships(smollm2):
    shipped = smollm2.chat_template
    ours = resolve_template("smollm2").jinja()
    for conversation in (CONVERSATION, CONVERSATION[1:], CONVERSATION[1:2]):
        for generation_prompt in (False, True):
            expected = smollm2.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt)
            got = smollm2.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt,
                                              chat_template=ours)
            assert got == expected
    assert shipped == smollm2.chat_template


def test_get_chat_template_sets_the_template_and_keeps_an_eos_already_in_the_vocabulary(smollm2):
    tokenizer = get_chat_template(smollm2, "chatml")
    assert tokenizer is smollm2
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == CHATML_FULL
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)


def test_end_of_turn_that_is_another_token_of_the_vocabulary_becomes_eos(smollm2):
    get_chat_template(smollm2, "falcon-3")  # ends turns with <|endoftext|>, id 0 in SmolLM2
    assert (smollm2.eos_token, smollm2.eos_token_id) == ("<|endoftext|>", 0)


def test_map_eos_token_renames_eos_to_the_end_of_turn_text(smollm2, tmp_path):
    from transformers import AutoTokenizer

    get_chat_template(smollm2, "llama-3")
    assert (smollm2.eos_token, smollm2.eos_token_id) == ("<|eot_id|>", 2)
    assert smollm2("<|eot_id|>", add_special_tokens=False)["input_ids"] == [2]
    assert smollm2.decode([2]) == "<|eot_id|>"
    assert len(smollm2("<|im_end|>", add_special_tokens=False)["input_ids"]) > 1  # no longer a token
    assert smollm2("Hello world", add_special_tokens=False)["input_ids"] == [19556, 905]  # the rest is untouched
    smollm2.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert (reloaded.eos_token, reloaded.eos_token_id) == ("<|eot_id|>", 2)
    assert reloaded.chat_template == smollm2.chat_template
    ids = reloaded.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert ids[-1] == 2


def test_without_map_eos_token_the_end_of_turn_is_plain_text(smollm2):
    get_chat_template(smollm2, "llama-3", map_eos_token=False)
    assert (smollm2.eos_token, smollm2.eos_token_id) == ("<|im_end|>", 2)
    assert len(smollm2("<|eot_id|>", add_special_tokens=False)["input_ids"]) > 1


def test_mapping_reads_sharegpt_keys(smollm2):
    mapping = {"role": "from", "content": "value", "user": "human", "assistant": "gpt"}
    get_chat_template(smollm2, "chatml", mapping=mapping)
    sharegpt = [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
                for m in CONVERSATION]
    assert smollm2.apply_chat_template(sharegpt, tokenize=False) == CHATML_FULL


def test_system_message_replaces_the_default(smollm2):
    get_chat_template(smollm2, "qwen-2.5", system_message="Be brief.")
    text = smollm2.apply_chat_template(CONVERSATION[1:3], tokenize=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello!")


def test_auto_keeps_the_model_template_and_fails_without_one(smollm2):
    shipped = smollm2.chat_template
    assert get_chat_template(smollm2, "auto").chat_template == shipped
    smollm2.chat_template = None
    with pytest.raises(DataError, match="ships no chat template"):
        get_chat_template(smollm2, "auto")


def test_custom_template_pair(smollm2):
    jinja = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    get_chat_template(smollm2, (jinja, "<|endoftext|>"))
    assert smollm2.chat_template == jinja and smollm2.eos_token == "<|endoftext|>"


def test_system_message_on_a_template_without_a_default_is_refused(smollm2):
    with pytest.raises(NotImplementedError, match="system_message is not supported"):
        get_chat_template(smollm2, "qwen-3", system_message="Be brief.")


def test_public_names_are_exported_from_the_package():
    import tuneforge
    from tuneforge.data.formats import standardize_sharegpt
    from tuneforge.data.masking import train_on_responses_only

    assert tuneforge.get_chat_template is get_chat_template
    assert tuneforge.standardize_sharegpt is standardize_sharegpt
    assert tuneforge.train_on_responses_only is train_on_responses_only


def test_apply_chat_template_takes_a_datasets_column_of_conversations(smollm2):
    """datasets >= 4 returns a lazy Column for dataset["conversations"]; Unsloth's Qwen 3 notebooks
    pass it to apply_chat_template as a batch."""
    import pickle

    import pandas as pd
    from datasets import Dataset

    tokenizer = get_chat_template(smollm2, "chatml")
    rows = Dataset.from_list([{"conversations": CONVERSATION[1:3]}, {"conversations": CONVERSATION[1:5]}])
    column = rows["conversations"]
    assert not isinstance(column, list)
    expected = [tokenizer.apply_chat_template(list(c), tokenize=False) for c in rows["conversations"]]
    assert tokenizer.apply_chat_template(column, tokenize=False) == expected
    assert tokenizer.apply_chat_template(pd.Series(list(column)), tokenize=False) == expected
    assert pickle.loads(pickle.dumps(tokenizer)).apply_chat_template(column, tokenize=False) == expected
