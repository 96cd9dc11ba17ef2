"""inference.generate: after `for_inference`, `model.generate` runs the static-cache loop and gives
transformers' `generate` output token for token; what it does not support goes to transformers
with one log line.

Reference: transformers' own `generate` on the SAME model object (`transformers_generate`), so
only the decode machinery differs (cache, masks, positions, token choice, stopping); the base
modules, LoRA layers and NF4 weights are shared. Greedy decoding is compared exactly. That is
meaningful only without near-ties: the tiny models' output layer is scaled x20 (a random model's
logits are nearly flat) and every reference run asserts the best and second-best scores differ
by more than MARGIN, far above the fp32 differences between two attention paths (~1e-6).

On the CPU the decode step runs eagerly; the GPU test checks that replaying the captured CUDA
graph gives the eager loop's tokens.
"""

import logging

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tuneforge.inference import Decoder, enable_fast_generate, transformers_generate
from tuneforge.inference.generate import WARMUP_STEPS, resolve_call
from tuneforge.inference.sampling import Sampling, choose, warp
from tuneforge.fast_language_model import FastLanguageModel
from tuneforge.testing import tiny_model
from tuneforge.testing.tiny import randomize_lora_b

pytestmark = pytest.mark.usefixtures("one_thread")

MARGIN = 1e-3
PAD = 0
LOGGER = "tuneforge.inference.generate"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> an HF folder of its tiny random model, output layer scaled x20."""
    made = {}

    def folder(family: str):
        if family not in made:
            model = tiny_model(family, seed=0)
            with torch.no_grad():
                model.get_output_embeddings().weight.mul_(20)
            made[family] = tmp_path_factory.mktemp(family)
            model.save_pretrained(made[family])
        return made[family]

    return folder


def _load(folder, four_bit=False, adapter=False, dtype=torch.float32, **options):
    # fp32 on every device: these tests compare tokens, and a GPU's default bf16 turns the tiny
    # models' logits into exact ties (the reference's near-tie check refuses those).
    model, _ = FastLanguageModel.from_pretrained(str(folder), load_in_4bit=four_bit, max_seq_length=128, dtype=dtype,
                                                 **options)
    if adapter:  # nonzero LoRA B, so the adapter changes the tokens
        model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
        randomize_lora_b(model, std=0.3)
    return FastLanguageModel.for_inference(model)


def _inner(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _prompts(batch: int, device=None, seed=1):
    """(input_ids, attention_mask) [batch, 9]; row i (i > 0) left-padded by 3 * i tokens; on the
    device the loader puts models on (CUDA when there is one) unless told."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ids = torch.randint(3, 300, (batch, 9), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, : 3 * row] = 0
    ids[mask == 0] = PAD
    return ids.to(device), mask.to(device)


def _reference(model, ids, mask, check_ties=True, **options):
    """transformers' greedy output and its smallest top-1/top-2 score gap over real rows and steps;
    with check_ties, asserts the gap is above MARGIN (else the comparison would hinge on rounding)."""
    out = transformers_generate(model, ids, attention_mask=mask, do_sample=False, pad_token_id=PAD,
                                output_scores=True, return_dict_in_generate=True, **options)
    top2 = torch.stack(out.scores).topk(2, dim=-1).values  # [steps, batch, 2]
    finite = top2[..., 1].isfinite()
    gap = (top2[..., 0] - top2[..., 1])[finite].min().item()
    if check_ties:
        assert gap > MARGIN, f"near-tie in the reference ({gap:.2e}): the comparison would hinge on rounding"
        return out.sequences
    return out.sequences, gap


def _assert_greedy_equal(model, batch, new=10, **options):
    """Greedy tokens equal transformers' on the first of a few prompt draws whose reference has no
    near-tie (a random model on the GPU sometimes ties within rounding on one draw)."""
    options = dict(max_new_tokens=new, eos_token_id=None, **options)
    for seed in range(1, 6):
        ids, mask = _prompts(batch, next(model.parameters()).device, seed=seed)
        expected, gap = _reference(model, ids, mask, check_ties=False, **options)
        if gap > MARGIN:
            break
    assert gap > MARGIN, f"every prompt draw has a near-tie in the reference ({gap:.2e})"
    got = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=PAD, **options)
    assert _inner(model).tuneforge.generate_path.startswith("static cache")
    assert got.shape == expected.shape == (batch, 9 + new)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("adapter", [False, True], ids=["model", "lora"])
@pytest.mark.parametrize("four_bit", [False, True], ids=["16bit", "4bit"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_greedy_equals_transformers_batch_1_and_left_padded_3(folders, family, four_bit, adapter):
    model = _load(folders(family), four_bit, adapter)
    _assert_greedy_equal(model, batch=1)
    _assert_greedy_equal(model, batch=3)


@pytest.mark.parametrize("family, overrides, scale", [
    ("mistral", dict(sliding_window=4), 20),  # one window for every layer: one 4D mask
    ("gemma2", dict(sliding_window=4, final_logit_softcapping=None), 3),  # alternating: a mask per type; eager
    ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1), 20),  # mixed by layer_types
])
def test_sliding_windows_shorter_than_the_sequence(family, overrides, scale):
    """Windows of 4 over 9 + 10 tokens: the masks must cut attention as transformers' caches do.

    Each case fails if the decode mask ignores the window (checked by breaking it). Gemma 2's
    output layer is scaled x3 only: at x20 its tokens no longer depend on the distant context.
    """
    model = tiny_model(family, seed=0, **overrides)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    enable_fast_generate(model)
    _assert_greedy_equal(model, batch=3)


def test_kernel_backed_modules_and_fused_lora(folders):
    """The patched attention (RoPE kernel) writes the static cache too; kernels under the interpreter."""
    model = _load(folders("llama"), adapter=True, use_kernels=True)
    assert "rope" in _inner(model).tuneforge.kernels and _inner(model).tuneforge.lora_kernels
    _assert_greedy_equal(model, batch=3, new=5)


@pytest.fixture(scope="module")
def llama(folders):
    return _load(folders("llama"))


def _eos_of(model, ids, mask, row=0, step=3) -> tuple[int, int]:
    """(token, at): a token the reference emits in `row` first at step `at` >= `step`, to use as EOS."""
    out = transformers_generate(model, ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                pad_token_id=PAD, eos_token_id=None)
    new = out[row, ids.shape[1]:].tolist()
    at = next(i for i in range(step, len(new)) if new[i] not in new[:i])
    return new[at], at


def test_eos_stops_each_row_and_pads_after(llama):
    ids, mask = _prompts(3)
    eos, at = _eos_of(llama, ids, mask)
    options = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD, eos_token_id=eos)
    expected = transformers_generate(llama, ids, **options)
    got = llama.generate(ids, **options)
    assert torch.equal(got, expected)
    first = got[0, 9:].tolist()
    assert first[at] == eos and set(first[at + 1:]) <= {PAD}, "row 0 stops at its EOS and is padded after"
    assert (got[1:, 9 + at + 1:] != PAD).any(), "the other rows go on after row 0 stopped"


def test_min_new_tokens_blocks_eos(llama):
    ids, mask = _prompts(3)
    eos, _ = _eos_of(llama, ids, mask)
    options = dict(attention_mask=mask, max_new_tokens=10, min_new_tokens=6, do_sample=False, pad_token_id=PAD,
                   eos_token_id=eos)
    got = llama.generate(ids, **options)
    assert torch.equal(got, transformers_generate(llama, ids, **options))
    assert (got[:, 9 : 9 + 6] != eos).all()


def test_batch_ending_early_returns_transformers_length(llama):
    """Every row emits EOS before max_new_tokens: the output is as long as transformers' (not max_new)."""
    ids, mask = _prompts(1)
    eos, at = _eos_of(llama, ids, mask, step=2)
    options = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD, eos_token_id=eos)
    got = llama.generate(ids, **options)
    assert got.shape == (1, 9 + at + 1) and torch.equal(got, transformers_generate(llama, ids, **options))


class Recorder:
    """A streamer (TextStreamer's interface) that keeps what it was given."""

    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended += 1


def test_streamer_receives_what_transformers_streams(llama):
    ids, mask = _prompts(1)
    eos, at = _eos_of(llama, ids, mask, step=4)
    ours, theirs = Recorder(), Recorder()
    options = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD, eos_token_id=eos)
    llama.generate(ids, streamer=ours, **options)
    transformers_generate(llama, ids, streamer=theirs, **options)
    assert ours.puts == theirs.puts and ours.ended == theirs.ended == 1
    assert len(ours.puts) == 1 + at + 1, "the prompt, then one put per token up to the EOS"


# --- sampling ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [
    (1.0, 0, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.3, 0, 0.8, 0.0), (0.5, 3, 0.6, 0.0), (1.0, 1, 0.3, 0.0),
    (1.5, 0, 1.0, 0.1), (0.8, 10, 0.9, 0.05), (1.0, 0, 1.0, 1.0),
])
def test_filters_equal_transformers_warpers(temperature, top_k, top_p, min_p):
    scores = torch.randn(6, 50, generator=torch.Generator().manual_seed(2))
    scores[0, :4] = scores[0].max()  # ties at the top-k boundary are kept by both
    expected = scores.clone()
    for make, on in ((lambda: TemperatureLogitsWarper(temperature), temperature != 1.0),
                     (lambda: TopKLogitsWarper(top_k), top_k > 0), (lambda: TopPLogitsWarper(top_p), top_p < 1.0),
                     (lambda: MinPLogitsWarper(min_p), min_p > 0.0)):
        if on:  # generate only adds the warpers that change something (their constructors refuse the rest)
            expected = make()(None, expected)
    assert torch.equal(warp(scores, Sampling(True, temperature, top_k, top_p, min_p)), expected)


def test_exponential_race_samples_the_softmax_distribution():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    torch.manual_seed(0)
    drawn = choose(probs.log().expand(40_000, 5).contiguous(), Sampling(do_sample=True))
    frequencies = torch.bincount(drawn, minlength=5).float() / drawn.numel()
    # 4 standard deviations of a frequency over 40,000 draws is < 0.01; a zero-probability token never comes.
    torch.testing.assert_close(frequencies, probs, rtol=0, atol=0.01)
    assert frequencies[4] == 0


def _sample(model, ids, mask, seed, **options):
    torch.manual_seed(seed)
    return model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, pad_token_id=PAD,
                          eos_token_id=None, **options)


def test_sampling_top_k_1_is_greedy(llama):
    ids, mask = _prompts(3)
    greedy = llama.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD,
                            eos_token_id=None)
    assert torch.equal(_sample(llama, ids, mask, seed=1, top_k=1), greedy)


def test_sampling_is_seeded_and_stays_inside_top_k_and_top_p(llama):
    """temperature 20 flattens the (x20) logits, so the filters are what limits the choice."""
    ids, mask = _prompts(3)
    options = dict(temperature=20.0, top_k=4, top_p=0.9)
    first = _sample(llama, ids, mask, seed=5, **options)
    assert torch.equal(first, _sample(llama, ids, mask, seed=5, **options))
    greedy = llama.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD,
                            eos_token_id=None)
    assert not torch.equal(first, greedy), "nothing was sampled"
    # Teacher forcing: the logits that chose each new token, from one forward of the whole output.
    full_mask = torch.cat([mask, torch.ones(3, 10, dtype=mask.dtype, device=mask.device)], dim=1)
    with torch.no_grad():
        logits = _inner(llama)(input_ids=first, attention_mask=full_mask).logits[:, 8:-1].float()
    scores = logits / options["temperature"]
    rank = (scores > scores.gather(-1, first[:, 9:, None])).sum(-1)
    assert rank.max() < options["top_k"]
    kept = warp(scores.reshape(-1, scores.shape[-1]), Sampling(True, **options)).isfinite()
    assert kept.gather(-1, first[:, 9:].reshape(-1, 1)).all(), "a token outside the top-p nucleus"


def test_min_p_runs_on_the_fast_path_and_stays_inside_its_filter(llama, caplog):
    """Unsloth's notebooks sample with temperature=1.5, min_p=0.1: the static-cache path takes it."""
    ids, mask = _prompts(3)
    options = dict(temperature=20.0, min_p=0.3)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        first = _sample(llama, ids, mask, seed=5, **options)
    assert not [r for r in caplog.records if r.name == LOGGER], "fell back to transformers' generate"
    assert not _inner(llama).tuneforge.generate_path.startswith("transformers")
    assert torch.equal(first, _sample(llama, ids, mask, seed=5, **options))
    full_mask = torch.cat([mask, torch.ones(3, 10, dtype=mask.dtype, device=mask.device)], dim=1)
    with torch.no_grad():
        logits = _inner(llama)(input_ids=first, attention_mask=full_mask).logits[:, 8:-1].float()
    kept = warp((logits / options["temperature"]).reshape(-1, logits.shape[-1]), Sampling(True, **options)).isfinite()
    assert kept.gather(-1, first[:, 9:].reshape(-1, 1)).all(), "a token below min_p x the best probability"


@pytest.mark.parametrize("how", ["input_ids=", "positional", "inputs="])
@pytest.mark.parametrize("adapter", [False, True], ids=["plain", "lora"])
def test_batch_encoding_as_input_ids(folders, how, adapter):
    """transformers 5's apply_chat_template(..., return_tensors="pt") returns a BatchEncoding, and the
    notebooks pass it on as generate(input_ids=inputs): its ids and mask are used."""
    from transformers import BatchEncoding

    llama = _load(folders("llama"), adapter=adapter)
    ids, mask = _prompts(3)
    encoding = BatchEncoding({"input_ids": ids, "attention_mask": mask})
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    expected = llama.generate(ids, attention_mask=mask, **options)
    if how == "positional":
        got = llama.generate(encoding, **options)
    elif how == "inputs=":
        got = llama.generate(inputs=encoding, **options)
    else:
        got = llama.generate(input_ids=encoding, **options)
    assert torch.equal(got, expected)
    assert not _inner(llama).tuneforge.generate_path.startswith("transformers")


# --- what goes to transformers, and switching back ------------------------------------------------------


def test_unsupported_option_falls_back_with_one_log_line(llama, caplog):
    ids, mask = _prompts(3)
    options = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD, repetition_penalty=1.3)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = llama.generate(ids, **options)
        again = llama.generate(ids, **options)
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 1 and "repetition_penalty=1.3" in lines[0], lines
    assert _inner(llama).tuneforge.generate_path.startswith("transformers")
    expected = transformers_generate(llama, ids, **options)
    assert torch.equal(got, expected) and torch.equal(again, expected)


@pytest.mark.parametrize("arguments, reason", [
    (dict(num_beams=2), "num_beams=2"),
    (dict(output_scores=True, return_dict_in_generate=True), "output_scores=True"),
    (dict(stop_strings=["x"]), "stop_strings"),
    (dict(token_type_ids=None, position_ids=torch.zeros(1, 9, dtype=torch.long)), "argument position_ids="),
])
def test_fallback_reasons_name_the_argument(llama, caplog, arguments, reason):
    ids, mask = _prompts(1)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        try:
            llama.generate(ids, attention_mask=mask, max_new_tokens=3, pad_token_id=PAD, **arguments)
        except Exception:  # noqa: BLE001 - transformers may refuse the call itself (stop_strings without a tokenizer)
            pass
    assert reason in caplog.text


def test_unsupported_family_falls_back(caplog):
    model = tiny_model("falcon", seed=0)
    enable_fast_generate(model)
    ids, mask = _prompts(1)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    assert "family falcon" in caplog.text
    assert torch.equal(got, transformers_generate(model, ids, attention_mask=mask, max_new_tokens=4,
                                                  do_sample=False, pad_token_id=PAD))


def test_for_training_restores_transformers_generate(folders):
    model = _load(folders("llama"), adapter=True)
    inner = model.get_base_model()
    ids, mask = _prompts(1)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, pad_token_id=PAD)
    assert "generate" in vars(inner) and inner.tuneforge.generate_path.startswith("static cache")
    FastLanguageModel.for_training(model)
    assert "generate" not in vars(inner) and "_tuneforge_fast_generate" not in vars(inner)
    assert inner.generate.__func__ is type(inner).generate
    FastLanguageModel.for_inference(model)
    assert vars(inner)["generate"].__func__ is not type(inner).generate


def test_decoder_reuses_its_session_for_same_shapes(llama):
    """Calls of the same batch and rounded length share one cache (and, on CUDA, one graph); a
    shorter prompt after a longer one must not see the earlier call's keys left in the cache."""
    inner = _inner(llama)
    decoder = Decoder(inner)
    ids, mask = _prompts(3)
    decoder.generate(resolve_call(inner, (ids,), dict(attention_mask=mask, max_new_tokens=5, pad_token_id=PAD,
                                                      eos_token_id=None)))
    session = decoder.session
    shorter = dict(attention_mask=mask[:, 2:], max_new_tokens=8, pad_token_id=PAD, eos_token_id=None)
    got = decoder.generate(resolve_call(inner, (ids[:, 2:],), shorter))
    assert decoder.session is session
    assert torch.equal(got, transformers_generate(llama, ids[:, 2:], do_sample=False, **shorter))
    decoder.generate(resolve_call(inner, (ids[:2],), dict(attention_mask=mask[:2], max_new_tokens=5, pad_token_id=PAD)))
    assert decoder.session is not session


def test_warm_up_steps_before_capture_leave_no_trace(llama):
    """Capture needs eager warm-up steps after the prefill; they must not change the generation
    (on the CPU the steps run without capture, the bookkeeping is the same)."""
    inner = _inner(llama)
    ids, mask = _prompts(3)
    options = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    call = resolve_call(inner, (ids,), options)
    decoder = Decoder(inner)
    session = decoder._session_for(call)
    decoder._prefill(session, call)
    decoder._rehearse(session, call.sampling, WARMUP_STEPS)
    for _ in range(call.max_new - 1):
        decoder._decode_step(session, call.sampling)
    assert int(session.step) == call.max_new - 1 and int(session.slot) == 9 + call.max_new - 1
    assert torch.equal(session.tokens[:, : call.max_new], _reference(llama, ids, mask, max_new_tokens=10,
                                                                     eos_token_id=None)[:, 9:])


@pytest.mark.slow
def test_smollm2_greedy_chat_answer_equals_transformers(smollm2_dir, monkeypatch):
    """The real SmolLM2-135M-Instruct: its own EOS ends the answer, as in transformers."""
    from transformers import AutoTokenizer

    monkeypatch.setenv("TUNEFORGE_DISABLE_KERNELS", "1")  # the Triton interpreter would cost minutes
    model = _load(smollm2_dir)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    options = dict(max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    got = model.generate(**inputs, **options)
    assert model.tuneforge.generate_path.startswith("static cache")
    assert torch.equal(got, transformers_generate(model, **inputs, **options))
    assert tokenizer.decode(got[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


# --- GPU ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("four_bit", [False, True], ids=["16bit", "4bit"])
def test_cuda_graph_replay_gives_the_eager_loops_tokens(folders, four_bit):
    """fp32 compute, kernels and fused LoRA on: the captured step equals the eager step and
    transformers, for greedy (batch 1 and a left-padded 3), an EOS ending rows at different
    steps (the host checks every CHECK_EVERY steps), top_k=1 sampling; replays reuse the graph."""
    model = _load(folders("llama"), four_bit, adapter=True, dtype=torch.float32)
    inner = _inner(model)
    ids, mask = _prompts(3, "cuda")
    eos, _ = _eos_of(model, ids, mask, row=1, step=2)
    calls = [dict(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=20, eos_token_id=None),
             dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, eos_token_id=None),
             dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, eos_token_id=eos),
             dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, eos_token_id=eos, do_sample=True, top_k=1)]
    results = {}
    for graphs in (False, True):
        enable_fast_generate(model, cuda_graphs=graphs)
        results[graphs] = []
        for call in calls:
            call = dict(call)
            results[graphs].append(model.generate(pad_token_id=PAD, **{"do_sample": False, **call}))
            assert ("CUDA graph" in inner.tuneforge.generate_path) == graphs, inner.tuneforge.generate_path
        if graphs:  # the same call again replays the graph captured for it
            graph = vars(inner)["generate"].__func__.args[0].decoder.session.graph
            assert torch.equal(model.generate(pad_token_id=PAD, **calls[-1]), results[True][-1])
            assert vars(inner)["generate"].__func__.args[0].decoder.session.graph is graph, "re-captured"
    for eager, replayed, call in zip(results[False], results[True], calls):
        assert torch.equal(replayed, eager)
    for got, call in zip(results[True][:3], calls[:3]):
        expected = transformers_generate(model, do_sample=False, pad_token_id=PAD, **call)
        assert torch.equal(got, expected)
    assert torch.equal(results[True][3], results[True][2]), "top_k=1 sampling is greedy"
