"""Every family exports to GGUF that llama.cpp runs as transformers does, and the family table says so.

Per family with a `gguf_arch` in the family table: the family's tiny random model (its tiny-test
config and 317-token vocabulary, with a byte-level BPE tokenizer of that size trained here, so the
file carries a real tokenizer and stays small), weights rounded to float16 so that an F16 GGUF holds
exactly what transformers runs, then

  - F16 GGUF, loaded by llama-cpp-python: next-token logits at every position of several prompts
    within 2e-3 of the logit range of transformers' (fp32). llama.cpp keeps its KV cache in F16, so
    ~5e-4 remains; a wrong Q/K layout, norm offset, scale or soft-cap moves logits by ~the range;
  - Q8_0 GGUF: loads, its logits stay within 5 % of the range, and it generates tokens that
    transformers ranks among its top five at every step. Mixture-of-experts families (Qwen3-MoE,
    Mixtral) may leave that tolerance at a few isolated positions (at most 1 in 20): there Q8_0's
    ~1 % rounding of the hidden states tips a near-tied router to another expert, a real property
    of the quantised model that moves that position's logits by ~10 % of the range while its
    neighbours stay at ~1 %.

Each outcome (with the measured differences) is written to build/family_results as
`<family>__gguf_f16.json` / `<family>__gguf_q8_0.json`; scripts/family_table.py renders the table's
"GGUF export" column from them, and the last test fails when the committed column differs.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from export_helpers import llama_cpp_quiet, spread_weights
from family_table import RESULTS, recorded
from transformers import PreTrainedTokenizerFast

from tuneforge.export.gguf import write_gguf
from tuneforge.export.gguf_arch import UnsupportedForGGUF
from tuneforge.export.merge import ModuleSource
from tuneforge.models.families import all_families
from tuneforge.testing import TINY_DIMENSIONS, tiny_model

pytest.importorskip("llama_cpp", reason="needs the gguf extra: pip install 'tuneforge[gguf]'")

ROOT = Path(__file__).resolve().parents[2]
_STARTED = time.time()
FAMILIES = sorted(name for name, spec in all_families().items() if spec.gguf_arch)
F16_TOLERANCE = 2e-3  # of the logit range
Q8_TOLERANCE = 0.05
# Several prompts, each compared up to the GGUF's context length (a model whose sliding window
# llama.cpp cannot run is exported with its context capped at the window: 16 tokens for the tiny
# Mistral and StarCoder 2).
TEXTS = ["The quick brown fox jumps over the lazy dog. " * 5, "def add(a, b):\n    return a + b\n",
         "Paris is the capital of France; Berlin is the capital of", "1, 2, 3, 5, 8, 13, 21, 34"]
# Config changes on top of the family's tiny-test overrides, and why.
GGUF_OVERRIDES = {
    # The family tests' final soft-cap 0.3 squeezes the logits into (-0.3, 0.3), so "of the range"
    # would weigh F16 rounding 30x; a cap of 3 still bends logits of up to ~5 hard.
    "gemma2": {"final_logit_softcapping": 3.0},
    # gpt-oss's YaRN keeps its correction range fractional (truncate=false); llama.cpp rounds it to
    # whole dimensions, as every gpt-oss GGUF runs (the exporter warns). Rounded here, so the test
    # measures the export; the fractional range drifts with position (3.4e-3 of the range by
    # token 46 on this tiny model): test_gguf_moe.py records it.
    "gpt_oss": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                    "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                                    "beta_slow": 1.0, "truncate": True}},
}
# Layouts the family's tiny config does not reach: (id, family, config changes).
VARIANTS = [
    ("falcon-7b-multi-query", "falcon", dict(new_decoder_architecture=False, multi_query=True, num_kv_heads=None)),
    ("stablelm-2-12b-qk-norms-parallel", "stablelm", dict(qk_layernorm=True, use_parallel_residual=True)),
    ("olmo2-tied-output", "olmo2", dict(tie_word_embeddings=True)),
    # Phi-3.5's LongRoPE: the short factors while the context (n_ctx 128, which llama.cpp rounds up
    # to 256) stays within the original length, as transformers uses them for sequences within it.
    ("phi3.5-longrope", "phi3", dict(max_position_embeddings=1024, original_max_position_embeddings=256, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
        "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0], "short_factor": [1.0, 1.5, 2.0, 3.0, 5.0, 9.0]})),
]


@pytest.fixture(scope="module")
def tokenizer():
    """A GPT-2-style byte-level BPE of the tiny models' vocabulary size (ids 0-2: pad, bos, eos, as the
    tiny configs say), trained on the prompts: llama.cpp reads it as a "gpt2" vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(TEXTS * 8, trainers.BpeTrainer(
        vocab_size=TINY_DIMENSIONS["vocab_size"], special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def model_for(family: str, **changes):
    overrides = {**GGUF_OVERRIDES.get(family, {}), **changes}
    return spread_weights(tiny_model(family, **overrides), fp16_exact=True)


def prompts(tokenizer, context: int) -> list[list[int]]:
    """Each text's token ids, up to `context` and at most 48 tokens."""
    return [tokenizer(text, add_special_tokens=False)["input_ids"][:min(context, 48)] for text in TEXTS]


def context_length(llm) -> int:
    return int(llm.metadata[f"{llm.metadata['general.architecture']}.context_length"])


def logits_of(llm, ids: list[int]) -> np.ndarray:
    """[len(ids), vocab] logits of llama.cpp (the model was loaded with logits_all=True)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def reference(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def position_differences(llm, model, tokenizer) -> list[np.ndarray]:
    """Per prompt, per position: max |llama.cpp - transformers| over the vocabulary, / the logit range."""
    out = []
    for ids in prompts(tokenizer, context_length(llm)):
        want = reference(model, ids)
        out.append(np.abs(logits_of(llm, ids) - want).max(axis=-1) / (want.max() - want.min()))
    return out


def relative_differences(llm, model, tokenizer) -> list[float]:
    """Per prompt: max |llama.cpp - transformers| over every position and token, / the logit range."""
    return [float(positions.max()) for positions in position_differences(llm, model, tokenizer)]


def export(model, tokenizer, folder: Path, method: str) -> Path:
    # The name stays neutral: llama.cpp tweaks token attributes by the model's name ("phi3").
    return write_gguf(ModuleSource(model), tokenizer, folder / f"tiny.{method}.gguf", method, name="tiny",
                      progress=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_f16_gguf_logits_equal_transformers(family, tokenizer, tmp_path):
    with recorded(family, "gguf_f16", arch=all_families()[family].gguf_arch) as record:
        model = model_for(family)
        llm = llama_cpp_quiet(export(model, tokenizer, tmp_path, "f16"), n_ctx=128, logits_all=True)
        try:
            assert llm.metadata["general.architecture"] == all_families()[family].gguf_arch
            record["logit_diff"] = relative_differences(llm, model, tokenizer)
        finally:
            llm.close()
        print(f"{family}: max |llama.cpp - transformers| / range per prompt: {record['logit_diff']}")
        assert max(record["logit_diff"]) < F16_TOLERANCE, record["logit_diff"]


@pytest.mark.parametrize("family", FAMILIES)
def test_q8_0_gguf_loads_and_generates(family, tokenizer, tmp_path):
    with recorded(family, "gguf_q8_0") as record:
        model = model_for(family)
        llm = llama_cpp_quiet(export(model, tokenizer, tmp_path, "q8_0"), n_ctx=128, logits_all=True)
        try:
            positions = position_differences(llm, model, tokenizer)
            record["logit_diff"] = [float(p.max()) for p in positions]
            ids = prompts(tokenizer, 8)[2]
            generated = []
            for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                generated.append(token)
                if len(generated) == 6:
                    break
        finally:
            llm.close()
        if all_families()[family].experts:  # routing flips: isolated positions (module docstring)
            positions = np.concatenate(positions)
            record["positions_over"] = int((positions >= Q8_TOLERANCE).sum())
            record["median_diff"] = float(np.median(positions))
            assert record["positions_over"] <= len(positions) // 20, record
            assert record["median_diff"] < Q8_TOLERANCE / 2, record
        else:
            assert max(record["logit_diff"]) < Q8_TOLERANCE, record["logit_diff"]
        # Teacher-forced: each token llama.cpp chose is one transformers ranks in its top five.
        want = reference(model, ids + generated)[len(ids) - 1:-1]
        ranks = [int((row > row[token]).sum()) for row, token in zip(want, generated)]
        assert len(generated) == 6 and max(ranks) < 5, ranks


@pytest.mark.parametrize("family, changes", [(family, changes) for _, family, changes in VARIANTS],
                         ids=[name for name, _, _ in VARIANTS])
def test_layout_variants_equal_transformers(family, changes, tokenizer, tmp_path):
    model = model_for(family, **changes)
    llm = llama_cpp_quiet(export(model, tokenizer, tmp_path, "f16"), n_ctx=128, logits_all=True)
    try:
        differences = relative_differences(llm, model, tokenizer)
    finally:
        llm.close()
    assert max(differences) < F16_TOLERANCE, differences


@pytest.mark.parametrize("family, changes, message", [
    ("falcon", dict(alibi=True), "ALiBi"),
    ("falcon", dict(parallel_attn=False), "parallel"),
    ("starcoder2", dict(use_bias=False), "biases"),
    ("cohere", dict(use_qk_norm=True), "64 layers"),
    ("cohere", dict(tie_word_embeddings=False), "untied lm_head"),
    ("gemma2", dict(query_pre_attn_scalar=256), "query_pre_attn_scalar"),
    ("llama", dict(hidden_act="gelu"), "activation"),
])
def test_configs_llama_cpp_runs_differently_are_refused(family, changes, message, tokenizer, tmp_path):
    model = tiny_model(family, **changes)
    with pytest.raises(UnsupportedForGGUF, match=message):
        export(model, tokenizer, tmp_path, "f16")
    assert not list(tmp_path.glob("*.gguf"))


def test_family_table_gguf_column_is_what_this_run_proved():
    # Last in this file: the committed table's "GGUF export" column must be what this session's
    # results render (the other columns are tests/models/test_families.py's to check).
    import family_table as script  # scripts/family_table.py (tests/export/conftest.py: on the path)

    fresh = script.load_results(RESULTS, since=_STARTED)
    if not all((family, check) in fresh for family in FAMILIES for check in script.GGUF_CHECKS):
        pytest.skip("not every family's GGUF check ran in this session (-k, -x?): run the whole file")
    column = script.gguf_column(fresh)
    committed = script.read_column((ROOT / "docs" / "families.md").read_text(), "GGUF export")
    assert committed == column, "docs/families.md GGUF column out of date; run python scripts/family_table.py"
