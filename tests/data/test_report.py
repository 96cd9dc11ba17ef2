"""The dataset report: counts and reasons, the trained span marked, and the three hard errors each
raised by a planted defect (labels all masked, EOS never learned, pad == EOS)."""

from __future__ import annotations

import json

import pytest

from tuneforge.data import DataError, prepare_dataset
from tuneforge.data.report import HISTOGRAM_NAME, REPORT_NAME, PrepareStats, build_report, report_before_training

ROWS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "What is 2+2?", "input": "", "output": "2+2 equals 4."},
    {"instruction": "Say hello.", "input": "", "output": "Hello there, how are you today?"},
]
# An assistant turn that the template never closes with EOS.
NO_EOS_TEMPLATE = ("{% for m in messages %}{{ m.role }}: {% if m.role == 'assistant' %}{% generation %}"
                   "{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}"
                   "{% if add_generation_prompt %}assistant: {% endif %}")


def _fix(tokenizer):
    from tuneforge.models.loader import fix_tokenizer

    return fix_tokenizer(tokenizer)


def _prepare(tokenizer, rows=ROWS, **kwargs):
    stats = PrepareStats()
    kwargs.setdefault("chat_template", "chatml")
    prepare_dataset(rows, tokenizer, stats=stats, **kwargs)
    return stats


def test_report_counts_rows_tokens_and_eos(smollm2, tmp_path):
    tokenizer = _fix(smollm2)
    report = build_report(_prepare(tokenizer, max_seq_length=512), tokenizer)
    assert (report.rows_read, report.rows_kept, report.dropped, report.truncated) == (3, 3, {}, {})
    assert report.template == "chatml" and report.format == "alpaca"
    assert report.rows_ending_with_eos == 3 == report.turns_ending_with_eos
    assert 0 < report.trained_tokens < report.tokens and report.errors == []
    assert report.length_percentiles["max"] == max(report.lengths)
    marked = report.marked_example()
    assert "\u27e6Blue.<|im_end|>\u27e7" in marked and "Name a colour." in marked.split("\u27e6")[0]
    json_path, png = report.write(tmp_path)
    assert json_path.name == REPORT_NAME and png.name == HISTOGRAM_NAME and png.stat().st_size > 1000
    saved = json.loads(json_path.read_text())
    assert saved["trained_fraction"] == pytest.approx(report.trained_tokens / report.tokens, abs=1e-6)
    assert saved["first_example_marked"] == marked


def test_truncated_and_dropped_rows_carry_their_reason(smollm2):
    tokenizer = _fix(smollm2)
    rows = ROWS + [{"instruction": "Count. " * 40, "input": "", "output": "One two three. " * 20}]
    truncated = build_report(_prepare(tokenizer, rows, max_seq_length=100, overflow="truncate"), tokenizer)
    assert list(truncated.truncated.values()) == [1] and "overflow=truncate" in next(iter(truncated.truncated))
    assert truncated.rows_ending_with_eos == 3 and any("without EOS" in w for w in truncated.warnings)
    dropped = build_report(_prepare(tokenizer, rows, max_seq_length=100, overflow="drop"), tokenizer)
    assert dropped.rows_kept == 3 and list(dropped.dropped.values()) == [1]
    # The prompt alone outgrows the limit: truncation leaves no trained token, so the row goes.
    rows = ROWS + [{"instruction": "Count. " * 60, "input": "", "output": "Done."}]
    emptied = build_report(_prepare(tokenizer, rows, max_seq_length=100, overflow="truncate"), tokenizer)
    assert "no assistant token" in next(iter(emptied.dropped)) and emptied.rows_kept == 3


def test_every_label_masked_is_a_hard_error(smollm2, tmp_path):
    from datasets import Dataset

    tokenizer = _fix(smollm2)
    stats = _prepare(tokenizer, max_seq_length=512)
    stats.rows = Dataset.from_dict({"input_ids": stats.rows["input_ids"],
                                    "labels": [[-100] * len(ids) for ids in stats.rows["input_ids"]]})
    with pytest.raises(DataError, match="every label is masked"):
        report_before_training(stats, tokenizer, tmp_path)
    assert json.loads((tmp_path / REPORT_NAME).read_text())["errors"]  # written before it stops


def test_eos_never_learned_is_a_hard_error(smollm2):
    tokenizer = _fix(smollm2)
    tokenizer.chat_template = NO_EOS_TEMPLATE
    report = build_report(_prepare(tokenizer, chat_template=None, max_seq_length=512), tokenizer)
    assert report.turns_ending_with_eos == 0 and report.template == "the tokenizer's own"
    with pytest.raises(DataError, match="never learn to stop"):
        report.raise_errors()


def test_another_stop_token_ending_the_turns_counts(smollm2):
    """A model's own template may end turns with a token other than EOS that generation stops at."""
    tokenizer = _fix(smollm2)
    tokenizer.chat_template = NO_EOS_TEMPLATE.replace("{% endgeneration %}", "<|endoftext|>{% endgeneration %}")
    stats = _prepare(tokenizer, chat_template=None, max_seq_length=512)
    assert build_report(stats, tokenizer).errors  # EOS alone: never learned
    report = build_report(stats, tokenizer, stop_ids=[tokenizer.convert_tokens_to_ids("<|endoftext|>")])
    assert report.errors == [] and report.turns_ending_with_eos == 3


def test_raw_text_needs_no_eos(smollm2):
    tokenizer = _fix(smollm2)
    rows = [{"text": "The quick brown fox jumps over the lazy dog. " * 5}]
    report = build_report(_prepare(tokenizer, rows, chat_template=None, max_seq_length=32), tokenizer)
    assert report.format == "text" and report.errors == [] and report.template is None


def test_pad_equal_to_eos_is_a_hard_error(smollm2):
    tokenizer = _fix(smollm2)
    _prepare(tokenizer, max_seq_length=512)  # sets the chatml template (EOS <|im_end|>)
    tokenizer.pad_token = tokenizer.eos_token
    with pytest.raises(DataError, match="pad token is the EOS token"):
        build_report(_prepare(tokenizer, max_seq_length=512), tokenizer).raise_errors()


def test_console_lines_mark_the_trained_span(smollm2):
    tokenizer = _fix(smollm2)
    report = build_report(_prepare(tokenizer, max_seq_length=512), tokenizer)
    plain, coloured = "\n".join(report.lines(colour=False)), "\n".join(report.lines(colour=True))
    assert "3 rows read, 3 kept" in plain and "carry loss" in plain and "\u27e6" in plain
    assert "\x1b[1;32m" in coloured
