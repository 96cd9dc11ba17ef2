# An Unsloth Alpaca notebook as its users write it (Llama-3.1 8B Alpaca shape: TrainingArguments,
# trainer-level dataset_text_field / max_seq_length / packing, fp16 / bf16 from is_bfloat16_supported),
# on SmolLM2 with a small local dataset and a few steps. tests/notebooks/test_notebooks.py runs it
# on tuneforge with only the imports switched.

# %% load
from unsloth import FastLanguageModel
import torch

max_seq_length = 256
dtype = None
load_in_4bit = True
device = "cuda" if torch.cuda.is_available() else "cpu"

model, tokenizer = FastLanguageModel.from_pretrained(
    model_name = "tuneforge/smollm2-135m-instruct",
    max_seq_length = max_seq_length,
    dtype = dtype,
    load_in_4bit = load_in_4bit,
)

# %% lora
model = FastLanguageModel.get_peft_model(
    model,
    r = 16,
    target_modules = ["q_proj", "k_proj", "v_proj", "o_proj",
                      "gate_proj", "up_proj", "down_proj",],
    lora_alpha = 16,
    lora_dropout = 0,
    bias = "none",
    use_gradient_checkpointing = "unsloth",
    random_state = 3407,
    use_rslora = False,
    loftq_config = None,
)

# %% data
alpaca_prompt = """Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

### Instruction:
{}

### Input:
{}

### Response:
{}"""

EOS_TOKEN = tokenizer.eos_token
def formatting_prompts_func(examples):
    instructions = examples["instruction"]
    inputs       = examples["input"]
    outputs      = examples["output"]
    texts = []
    for instruction, input, output in zip(instructions, inputs, outputs):
        text = alpaca_prompt.format(instruction, input, output) + EOS_TOKEN
        texts.append(text)
    return { "text" : texts, }

from datasets import load_dataset
dataset = load_dataset("json", data_files = "data/alpaca.jsonl", split = "train")
dataset = dataset.map(formatting_prompts_func, batched = True,)

# %% trainer
from trl import SFTTrainer
from transformers import TrainingArguments
from unsloth import is_bfloat16_supported

trainer = SFTTrainer(
    model = model,
    tokenizer = tokenizer,
    train_dataset = dataset,
    dataset_text_field = "text",
    max_seq_length = max_seq_length,
    dataset_num_proc = 2,
    packing = False,
    args = TrainingArguments(
        per_device_train_batch_size = 2,
        gradient_accumulation_steps = 1,
        warmup_steps = 1,
        max_steps = 3,
        learning_rate = 2e-4,
        fp16 = not is_bfloat16_supported(),
        bf16 = is_bfloat16_supported(),
        logging_steps = 1,
        optim = "adamw_8bit",
        weight_decay = 0.01,
        lr_scheduler_type = "linear",
        seed = 3407,
        output_dir = "outputs",
        report_to = "none",
    ),
)

# %% train
trainer_stats = trainer.train()
print(f"{trainer_stats.metrics['train_runtime']} seconds used for training.")
print(f"{round(trainer_stats.metrics['train_runtime']/60, 2)} minutes used for training.")

# %% inference
FastLanguageModel.for_inference(model)
inputs = tokenizer(
[
    alpaca_prompt.format(
        "Continue the fibonnaci sequence.",
        "1, 1, 2, 3, 5, 8",
        "",
    )
], return_tensors = "pt").to(device)

outputs = model.generate(**inputs, max_new_tokens = 16, use_cache = True)
answer = tokenizer.batch_decode(outputs)

# %% stream
from transformers import TextStreamer
text_streamer = TextStreamer(tokenizer)
_ = model.generate(**inputs, streamer = text_streamer, max_new_tokens = 16)

# %% save
model.save_pretrained("lora_model")
tokenizer.save_pretrained("lora_model")

# %% reload
if True:
    from unsloth import FastLanguageModel
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name = "lora_model",
        max_seq_length = max_seq_length,
        dtype = dtype,
        load_in_4bit = load_in_4bit,
    )
    FastLanguageModel.for_inference(model)

# %% reloaded inference
inputs = tokenizer(
[
    alpaca_prompt.format(
        "What is a famous tall tower in Paris?",
        "",
        "",
    )
], return_tensors = "pt").to(device)
_ = model.generate(**inputs, streamer = text_streamer, max_new_tokens = 16)

# %% merged
model.save_pretrained_merged("model", tokenizer, save_method = "merged_16bit",)
model.save_pretrained_merged("model_4bit", tokenizer, save_method = "merged_4bit_forced",)
model.save_pretrained_merged("model_lora", tokenizer, save_method = "lora",)

# %% gguf
model.save_pretrained_gguf("model", tokenizer, quantization_method = "f16")
