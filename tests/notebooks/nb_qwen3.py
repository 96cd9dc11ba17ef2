# An Unsloth Qwen3 notebook as its users write it (Qwen3 / Qwen3-2507 shape: FastModel, the
# "qwen3-instruct" template, standardize_data_formats, a reasoning + chat mix through a batched
# apply_chat_template and pandas, SFTConfig holding dataset_text_field, train_on_responses_only,
# generate(**tokenizer(text)) with sampling settings and a streamer), on SmolLM2 with small local
# datasets and a few steps.

# %% load
from unsloth import FastModel
import torch

device = "cuda" if torch.cuda.is_available() else "cpu"
model, tokenizer = FastModel.from_pretrained(
    model_name = "tuneforge/smollm2-135m-instruct",
    max_seq_length = 256,
    load_in_4bit = True,
    load_in_8bit = False,
    full_finetuning = False,
)

# %% lora
model = FastModel.get_peft_model(
    model,
    r = 32,
    target_modules = ["q_proj", "k_proj", "v_proj", "o_proj",
                      "gate_proj", "up_proj", "down_proj",],
    lora_alpha = 32,
    lora_dropout = 0,
    bias = "none",
    use_gradient_checkpointing = "unsloth",
    random_state = 3407,
    use_rslora = False,
    loftq_config = None,
)

# %% template
from unsloth.chat_templates import get_chat_template
tokenizer = get_chat_template(
    tokenizer,
    chat_template = "qwen3-instruct",
)

# %% data
from datasets import load_dataset
reasoning_dataset = load_dataset("json", data_files = "data/reasoning.jsonl", split = "train")
non_reasoning_dataset = load_dataset("json", data_files = "data/sharegpt.jsonl", split = "train")

def generate_conversation(examples):
    problems  = examples["problem"]
    solutions = examples["generated_solution"]
    conversations = []
    for problem, solution in zip(problems, solutions):
        conversations.append([
            {"role" : "user",      "content" : problem},
            {"role" : "assistant", "content" : solution},
        ])
    return { "conversations": conversations, }

reasoning_conversations = tokenizer.apply_chat_template(
    reasoning_dataset.map(generate_conversation, batched = True)["conversations"],
    tokenize = False,
)

# %% standardize
from unsloth.chat_templates import standardize_data_formats
dataset = standardize_data_formats(non_reasoning_dataset)

non_reasoning_conversations = tokenizer.apply_chat_template(
    dataset["conversations"],
    tokenize = False,
)

# %% mix
chat_percentage = 0.5

import pandas as pd
non_reasoning_subset = pd.Series(non_reasoning_conversations)
non_reasoning_subset = non_reasoning_subset.sample(
    int(len(reasoning_conversations) * (1.0 - chat_percentage)),
    random_state = 2407,
)
data = pd.concat([
    pd.Series(reasoning_conversations),
    pd.Series(non_reasoning_subset)
])
data.name = "text"

from datasets import Dataset
combined_dataset = Dataset.from_pandas(pd.DataFrame(data))
combined_dataset = combined_dataset.shuffle(seed = 3407)

# %% trainer
from trl import SFTTrainer, SFTConfig
trainer = SFTTrainer(
    model = model,
    tokenizer = tokenizer,
    train_dataset = combined_dataset,
    eval_dataset = None,
    args = SFTConfig(
        dataset_text_field = "text",
        per_device_train_batch_size = 2,
        gradient_accumulation_steps = 1,
        warmup_steps = 1,
        max_steps = 3,
        learning_rate = 2e-4,
        logging_steps = 1,
        optim = "adamw_8bit",
        weight_decay = 0.01,
        lr_scheduler_type = "linear",
        seed = 3407,
        report_to = "none",
    ),
)

# %% responses only
from unsloth.chat_templates import train_on_responses_only
trainer = train_on_responses_only(
    trainer,
    instruction_part = "<|im_start|>user\n",
    response_part = "<|im_start|>assistant\n",
)

# %% train
trainer_stats = trainer.train()
runtime = trainer_stats.metrics['train_runtime']

# %% inference
messages = [
    {"role" : "user", "content" : "Solve (x + 2)^2 = 0."}
]
text = tokenizer.apply_chat_template(
    messages,
    tokenize = False,
    add_generation_prompt = True,
    enable_thinking = False,
)

from transformers import TextStreamer
_ = model.generate(
    **tokenizer(text, return_tensors = "pt").to(device),
    max_new_tokens = 16,
    temperature = 0.7, top_p = 0.8, top_k = 20,
    streamer = TextStreamer(tokenizer, skip_prompt = True),
)

# %% save
model.save_pretrained("lora_model")
tokenizer.save_pretrained("lora_model")

# %% reload
if True:
    from unsloth import FastModel
    model, tokenizer = FastModel.from_pretrained(
        model_name = "lora_model",
        max_seq_length = 256,
        load_in_4bit = True,
    )

# %% gguf
model.save_pretrained_gguf("model", tokenizer, quantization_method = "q8_0")
