"""Labels are -100 everywhere except the tokens the assistant writes, checked token by token.

The reference for a tokenizer that does not merge across boundaries is transformers' own
assistant mask (apply_chat_template(..., return_assistant_tokens_mask=True), which maps the
template's {% generation %} character spans onto a one-shot tokenization). Where a tokenizer would
merge across a boundary, the policy of tuneforge.data.masking is checked directly: the prompt ids
are what inference gives, the reply ids are the reply's own tokenization, and the text is unchanged.
"""

import pytest

from data_samples import CONVERSATION
from tuneforge.data.errors import DataError
from tuneforge.data.masking import (
    IGNORE_INDEX,
    ResponseParts,
    assistant_spans,
    find_response_parts,
    make_label_masker,
    response_mask,
    tokenize_conversation,
    train_on_responses_only,
)
from tuneforge.data.templates import ChatTemplate, get_chat_template, render, resolve_template

REPLIES = ["Hi, how can I help?", "2+2 equals 4."]


def trained(result):
    return [i for i, label in zip(result.input_ids, result.labels) if label != IGNORE_INDEX]


def transformers_labels(tokenizer, conversation, template_name):
    """Labels from transformers' assistant mask, using the table template's generation tags."""
    out = tokenizer.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
        chat_template=resolve_template(template_name).jinja(),
    )
    return out["input_ids"], [t if m else IGNORE_INDEX for t, m in zip(out["input_ids"], out["assistant_masks"])]


@pytest.mark.parametrize("name", ["chatml", "smollm2", "qwen-2.5", "qwen-3", "llama-3.1", "gemma", "mistral-v3",
                                  "phi-3.5", "alpaca", "deepseek-v3", "cohere", "zephyr"])
def test_labels_are_exactly_the_assistant_tokens(smollm2, name):
    get_chat_template(smollm2, name)
    result = tokenize_conversation(CONVERSATION, smollm2)
    text = smollm2.apply_chat_template(CONVERSATION, tokenize=False)
    assert smollm2.decode(result.input_ids) == text
    if not result.differs_from_one_shot:
        ids, labels = transformers_labels(smollm2, CONVERSATION, name)
        assert result.input_ids == ids
        assert result.labels == labels
    # The trained tokens are the replies with their end-of-turn token, in order, nothing else.
    eot = smollm2.eos_token
    reply_texts = ["<think>\n\n</think>\n\n" + r if name == "qwen-3" and k == 1 else r for k, r in enumerate(REPLIES)]
    expected = []
    for reply in reply_texts:
        lead = " " if resolve_template(name).assistant.startswith(" ") else ""
        expected += smollm2(lead + reply + eot, add_special_tokens=False)["input_ids"]
    assert trained(result) == expected


def test_every_user_and_system_token_is_masked(smollm2):
    get_chat_template(smollm2, "chatml")
    result = tokenize_conversation(CONVERSATION, smollm2)
    masked_text = smollm2.decode([i for i, label in zip(result.input_ids, result.labels) if label == IGNORE_INDEX])
    for message in CONVERSATION:
        inside = message["content"] in masked_text
        assert inside == (message["role"] != "assistant"), message
    assert smollm2.decode(trained(result)) == "Hi, how can I help?<|im_end|>2+2 equals 4.<|im_end|>"


def test_the_models_own_template_without_generation_tags(smollm2):
    """SmolLM2 ships a template without {% generation %}: spans come from rendering turn by turn."""
    assert "generation %" not in smollm2.chat_template
    result = tokenize_conversation(CONVERSATION, smollm2)
    ids, labels = transformers_labels(smollm2, CONVERSATION, "smollm2")  # the same text, with tags
    assert (result.input_ids, result.labels) == (ids, labels)
    # And without a system turn the model's default system text is masked too.
    result = tokenize_conversation(CONVERSATION[1:], smollm2)
    assert smollm2.decode(trained(result)) == "Hi, how can I help?<|im_end|>2+2 equals 4.<|im_end|>"


def test_a_template_that_rewrites_earlier_turns_is_refused_without_tags(smollm2):
    smollm2.chat_template = (
        "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(DataError, match="renders a turn differently"):
        tokenize_conversation(CONVERSATION, smollm2)


def test_a_boundary_the_tokenizer_would_merge(smollm2):
    """'Answer: ' + 'Hello' is one token ' Hello' in one shot; the pieces keep prompt and reply apart."""
    template = ChatTemplate(name="answer", user="Question: {content}\n", assistant_prefix="Answer: ",
                            assistant="{content}<|im_end|>", assistant_suffix="\n", end_of_turn="<|im_end|>")
    conversation = [{"role": "user", "content": "Say hello"}, {"role": "assistant", "content": "Hello there"}]
    text = render(template, conversation)
    one_shot = smollm2(text, add_special_tokens=False)["input_ids"]
    result = tokenize_conversation(conversation, smollm2, chat_template=template)
    assert result.differs_from_one_shot and result.input_ids != one_shot
    assert smollm2.decode(result.input_ids) == text
    # The prompt is tokenized exactly as at inference (the generation prompt, one shot) ...
    prompt = render(template, conversation[:1], add_generation_prompt=True)
    prompt_ids = smollm2(prompt, add_special_tokens=False)["input_ids"]
    assert result.input_ids[: len(prompt_ids)] == prompt_ids
    assert all(label == IGNORE_INDEX for label in result.labels[: len(prompt_ids)])
    # ... and the reply is what the model must write after it, all of it trained.
    reply_ids = smollm2("Hello there<|im_end|>", add_special_tokens=False)["input_ids"]
    assert result.input_ids[len(prompt_ids): len(prompt_ids) + len(reply_ids)] == reply_ids
    assert trained(result) == reply_ids


@pytest.mark.parametrize("name", ["mistral-v1", "mistral-tekken", "llama-2"])
def test_a_tokenizer_that_adds_a_prefix_space_to_every_call(spiece, name):
    """SentencePiece-style: pieces are encoded after a newline so no space is invented at a cut."""
    result = tokenize_conversation(CONVERSATION, spiece, chat_template=name)
    text, spans = assistant_spans(CONVERSATION, spiece, chat_template=name)
    assert spiece.decode(result.input_ids) == text
    assert result.input_ids == spiece(text, add_special_tokens=False)["input_ids"]
    assert spiece.decode(trained(result)) == "".join(text[a:b] for a, b in spans).strip()


def test_encoding_pieces_naively_would_invent_spaces(spiece):
    """The trap the newline trick avoids, shown on mistral-tekken ('[/INST]Hi' has no space)."""
    text, spans = assistant_spans(CONVERSATION, spiece, chat_template="mistral-tekken")
    cut = spans[0][0]
    naive = spiece(text[:cut], add_special_tokens=False)["input_ids"] + spiece(text[cut:], add_special_tokens=False)["input_ids"]
    assert spiece.decode(naive) != text


def test_train_on_everything(smollm2):
    get_chat_template(smollm2, "chatml")
    result = tokenize_conversation(CONVERSATION, smollm2, train_on_responses_only=False)
    assert result.labels == result.input_ids


def test_a_conversation_without_reply_has_nothing_to_train(smollm2):
    get_chat_template(smollm2, "chatml")
    with pytest.raises(DataError, match="no assistant turn"):
        tokenize_conversation(CONVERSATION[:2], smollm2)


# --- token-level matching (train_on_responses_only on a tokenized dataset) ------------------------


def test_response_mask_with_and_without_end_markers():
    ids = [9, 1, 5, 5, 2, 7, 7, 3, 8, 2, 6, 3]  # 1 = user marker, 2 = response marker, 3 = end of turn
    keep = response_mask(ids, [[1]], [[2]], [[3]])
    assert [i for i, k in zip(ids, keep) if k] == [7, 7, 3, 6, 3]
    # Unsloth's rule without an end marker: a reply runs to the next user marker (or the end).
    keep = response_mask(ids, [[1]], [[2]])
    assert [i for i, k in zip(ids, keep) if k] == [7, 7, 3, 8, 6, 3]


def test_response_mask_restarts_at_packed_sample_boundaries():
    ids = [2, 7, 7, 4, 4, 2, 6]  # sample 1: reply 7 7 with no end marker; sample 2: 4 4, reply 6
    keep = response_mask(ids, [[1]], [[2]], None, seq_lengths=[3, 4])
    assert keep == [False, True, True, False, False, False, True]


def test_parts_are_found_from_the_template(smollm2):
    assert find_response_parts(smollm2) == ResponseParts("<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>")
    get_chat_template(smollm2, "llama-3.1")
    parts = find_response_parts(smollm2)
    assert parts.response_part == "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert parts.end_of_turn == "<|eot_id|>"


def test_label_masker_matches_the_exact_labels(smollm2):
    get_chat_template(smollm2, "chatml")
    exact = tokenize_conversation(CONVERSATION, smollm2)
    masker = make_label_masker(smollm2, "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>")
    assert masker({"input_ids": [exact.input_ids]})["labels"] == [exact.labels]


def test_train_on_responses_only_on_a_trl_trainer(smollm2, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from tuneforge.testing import tiny_model

    get_chat_template(smollm2, "chatml")
    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}]
    config = SFTConfig(output_dir=str(tmp_path), max_length=None, report_to=[], use_cpu=True, dataset_num_proc=None)
    trainer = SFTTrainer(model=tiny_model("llama", vocab_size=len(smollm2)), args=config,
                         train_dataset=Dataset.from_list(rows), processing_class=smollm2)
    before = trainer.train_dataset
    assert all(row["labels"] == row["input_ids"] for row in before)  # TRL trains on everything by default
    assert train_on_responses_only(trainer) is trainer
    for row, conversation in zip(trainer.train_dataset, [r["messages"] for r in rows]):
        exact = tokenize_conversation(conversation, smollm2)
        assert row["input_ids"] == exact.input_ids
        assert row["labels"] == exact.labels
    with pytest.raises(NotImplementedError, match="force_match"):
        train_on_responses_only(trainer, force_match=False)
    function = train_on_responses_only(trainer, "<|im_start|>user\n", "<|im_start|>assistant\n",
                                       return_function=True)
    assert callable(function)
