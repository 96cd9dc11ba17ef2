"""tuneforge.chat_templates: Unsloth's module path, the same functions as tuneforge.data, and the
notebook helpers to_sharegpt and standardize_data_formats."""

import pytest
from datasets import Dataset

import tuneforge
from tuneforge import chat_templates
from tuneforge.data.errors import DataError


def test_unsloth_names_are_tuneforge_data_functions():
    from tuneforge.data import formats, masking, templates

    assert chat_templates.get_chat_template is templates.get_chat_template
    assert chat_templates.standardize_sharegpt is formats.standardize_sharegpt
    assert chat_templates.train_on_responses_only is masking.train_on_responses_only
    assert tuneforge.to_sharegpt is chat_templates.to_sharegpt
    assert tuneforge.standardize_data_formats is chat_templates.standardize_data_formats
    for name in ("qwen3-instruct", "gemma-3", "llama-3.1", "chatml"):
        assert name in chat_templates.CHAT_TEMPLATES


def test_what_is_not_provided_says_what_to_use():
    with pytest.raises(ImportError, match="remove_special_tokens.*not provided.*skip_special_tokens"):
        from tuneforge.chat_templates import remove_special_tokens  # noqa: F401
    with pytest.raises(AttributeError):
        chat_templates.no_such_name  # noqa: B018


def test_standardize_data_formats_is_standardize_sharegpt():
    rows = Dataset.from_list([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}])
    out = chat_templates.standardize_data_formats(rows, tokenizer=None)
    assert out[0]["conversations"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]


TITANIC = Dataset.from_list([
    {"name": "Ann", "age": "30", "city": "Oslo", "survived": "yes"},
    {"name": "Bob", "age": "", "city": None, "survived": "no"},
    {"name": "Cy", "age": "7", "city": "Rome", "survived": "yes"},
])


def test_to_sharegpt_merges_columns_and_leaves_out_empty_optional_blocks():
    out = chat_templates.to_sharegpt(
        TITANIC, merged_prompt="{name}[[ is {age}]][[ from {city}]].", output_column_name="survived")
    assert out.column_names == ["conversations"]
    assert out[0]["conversations"] == [{"from": "human", "value": "Ann is 30 from Oslo."},
                                       {"from": "gpt", "value": "yes"}]
    # age "" and city None: both blocks go, and None never reads as "None".
    assert out[1]["conversations"][0]["value"] == "Bob."


def test_to_sharegpt_then_standardize_then_a_template(smollm2_tokenizer):
    out = chat_templates.standardize_sharegpt(
        chat_templates.to_sharegpt(TITANIC, merged_prompt="{name}", output_column_name="survived"))
    tokenizer = chat_templates.get_chat_template(smollm2_tokenizer, "chatml")
    text = tokenizer.apply_chat_template(out[0]["conversations"], tokenize=False)
    assert text == "<|im_start|>user\nAnn<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>\n"


def test_conversation_extension_chains_shuffled_rows_repeatably():
    first = chat_templates.to_sharegpt(TITANIC, merged_prompt="{name}", output_column_name="survived",
                                       conversation_extension=3, random_state=1)
    again = chat_templates.to_sharegpt(TITANIC, merged_prompt="{name}", output_column_name="survived",
                                       conversation_extension=3, random_state=1)
    assert first.to_list() == again.to_list() and len(first) == 3
    for k, row in enumerate(first):
        turns = row["conversations"]
        assert len(turns) == 6 and [t["from"] for t in turns] == ["human", "gpt"] * 3
        assert turns[0]["value"] == TITANIC[k]["name"]  # each row starts with its own pair
    kept = chat_templates.to_sharegpt(TITANIC, merged_prompt="{name}", output_column_name="survived",
                                      conversation_extension=2, remove_unused_columns=False)
    assert set(kept.column_names) >= {"conversations", "age", "city"}


@pytest.mark.parametrize("arguments, message", [
    (dict(merged_prompt="{nmae}"), "names column {nmae}"),
    (dict(merged_prompt="{name}[[ plain ]]"), "names no {column}"),
    (dict(merged_prompt="{name}", output_column_name="answer"), "output_column_name 'answer'"),
    (dict(merged_prompt="{name}", conversation_extension=0), "conversation_extension must be >= 1"),
])
def test_to_sharegpt_errors_name_the_problem(arguments, message):
    arguments = {"output_column_name": "survived", **arguments}
    with pytest.raises(DataError, match=message):
        chat_templates.to_sharegpt(TITANIC, **arguments)


def test_to_sharegpt_refuses_a_dataset_already_in_sharegpt():
    rows = Dataset.from_list([{"conversations": [{"from": "human", "value": "Hi"}]}])
    with pytest.raises(DataError, match="already has a conversations column"):
        chat_templates.to_sharegpt(rows)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_other_unsloth_names():
    from tuneforge import SFTConfig, SFTTrainer, UnslothTrainer, UnslothTrainingArguments, unsloth_train

    assert UnslothTrainer is SFTTrainer and UnslothTrainingArguments is SFTConfig

    class Trainer:
        def train(self, resume_from_checkpoint=None):
            return ("trained", resume_from_checkpoint)

    assert unsloth_train(Trainer(), resume_from_checkpoint=True) == ("trained", True)
    with pytest.raises(ImportError, match="FastVisionModel.*text models only"):
        from tuneforge import FastVisionModel  # noqa: F401
    from tuneforge import apply_chat_template

    assert apply_chat_template is chat_templates.apply_chat_template


SYSTEM = "Below are some instructions that describe some tasks. Write responses that appropriately complete each request."
# Unsloth's Ollama notebook's formats: text with {SYSTEM} (optional), {INPUT}, {OUTPUT}.
FORMATS = {
    "alpaca-like": (
        SYSTEM + "\n\n### Instruction:\n{INPUT}\n\n### Response:\n{OUTPUT}",
        SYSTEM + "\n\n### Instruction:\nAnn\n\n### Response:\nyes<|im_end|>\n\n### Instruction:\nBob\n\n"
        "### Response:\nno<|im_end|>",
        SYSTEM + "\n\n### Instruction:\nQ\n\n### Response:\n",
    ),
    "system line": (
        "{SYSTEM}\nUSER: {INPUT}\nASSISTANT: {OUTPUT}",
        SYSTEM + "\nUSER: Ann\nASSISTANT: yes<|im_end|>\nUSER: Bob\nASSISTANT: no<|im_end|>",
        SYSTEM + "\nUSER: Q\nASSISTANT: ",
    ),
    "chatml": (
        "<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{INPUT}<|im_end|>\n<|im_start|>assistant\n"
        "{OUTPUT}<|im_end|>",
        "<|im_start|>system\n" + SYSTEM + "<|im_end|>\n<|im_start|>user\nAnn<|im_end|>\n<|im_start|>assistant\n"
        "yes<|im_end|>\n<|im_start|>user\nBob<|im_end|>\n<|im_start|>assistant\nno<|im_end|>",
        "<|im_start|>system\n" + SYSTEM + "<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n",
    ),
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_apply_chat_template_renders_unsloth_text_formats(smollm2_tokenizer, name):
    import copy

    template, full, prompt = FORMATS[name]
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    rows = chat_templates.standardize_sharegpt(chat_templates.to_sharegpt(
        TITANIC.select([0, 1]), merged_prompt="{name}", output_column_name="survived"))
    two_turns = Dataset.from_list([{"conversations": rows[0]["conversations"] + rows[1]["conversations"]}])
    out = chat_templates.apply_chat_template(two_turns, tokenizer=tokenizer, chat_template=template)
    assert out[0]["text"] == full
    assert tokenizer.eos_token == "<|im_end|>"  # a reply ends with the tokenizer's EOS (or the template's end)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Q"}], add_generation_prompt=True,
                                         tokenize=False) == prompt


def test_apply_chat_template_errors(smollm2_tokenizer):
    rows = Dataset.from_list([{"conversations": [{"role": "user", "content": "Hi"}]}])
    with pytest.raises(DataError, match="must hold {OUTPUT} exactly once"):
        chat_templates.apply_chat_template(rows, tokenizer=smollm2_tokenizer, chat_template="USER: {INPUT}")
    with pytest.raises(NotImplementedError, match="extra_eos_tokens"):
        chat_templates.apply_chat_template(rows, tokenizer=smollm2_tokenizer, chat_template="U: {INPUT} A: {OUTPUT}",
                                           extra_eos_tokens=["<|endoftext|>"])
