"""The plan's estimate against what torch measures: weights and optimizer state to the byte, one
decoder layer's saved activations against autograd's saved-tensor hooks, the whole peak against the
H100 figures in bench/README.md, and the --fit search against a probe with a known answer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tuneforge.planning.estimate import GiB, DeviceSpec, ModelFacts, RunSetup, estimate, layer_activation_bytes, \
    optimizer_bytes, trainable_tensors, weight_bytes
from tuneforge.planning.fit import search

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tuneforge.testing import tiny_model

    folder = tmp_path_factory.mktemp("tiny-plan")
    tiny_model("llama", seed=0).save_pretrained(folder)
    return folder


def _load(folder, load_in_4bit=True, kernels=False, r=None):
    from tuneforge.fast_language_model import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(str(folder), load_in_4bit=load_in_4bit, use_kernels=kernels,
                                                 dtype=torch.float32)
    if r is not None:
        model = FastLanguageModel.get_peft_model(model, r=r, use_gradient_checkpointing=False, use_kernels=kernels)
    return model


def _stored_bytes(model) -> int:
    """Every tensor the model holds (parameters, NF4 quantisation state, buffers), each storage once."""
    storages = {}

    def add(tensor):
        if tensor is not None:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()

    for parameter in model.parameters():
        add(parameter.data)
        state = getattr(parameter, "quant_state", None)
        if state is not None:
            for tensor in (state.absmax, state.code, state.offset):
                add(tensor)
            if state.state2 is not None:
                add(state.state2.absmax)
                add(state.state2.code)
    for buffer in model.buffers():
        add(buffer)
    return sum(storages.values())


@pytest.mark.parametrize("load_in_4bit", [True, False], ids=["nf4", "fp32"])
def test_weight_bytes_equal_the_loaded_model(tiny_dir, load_in_4bit, one_thread):
    model = _load(tiny_dir, load_in_4bit)
    setup = RunSetup(batch=1, seq=8, mean_seq=8, quant="nf4" if load_in_4bit else "16bit", compute_bytes=4,
                     device="cpu", kernels=False)
    assert weight_bytes(ModelFacts.from_config(model.config), setup) == _stored_bytes(model)


def test_trainable_and_optimizer_state_equal_the_real_ones(tiny_dir, one_thread):
    from tuneforge.train.optim import build_optimizer

    # r=64 on a hidden-64 model: some adapters reach 4,096 elements (8-bit state), some not (32-bit).
    model = _load(tiny_dir, r=64)
    optimizer = build_optimizer(model, optim="adamw_8bit", learning_rate=1e-3)
    ids = torch.randint(3, 300, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    storages = {}
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.numel() > 1:
                storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    setup = RunSetup(batch=2, seq=16, mean_seq=16, compute_bytes=4, device="cpu", kernels=False, lora_r=64)
    sizes = trainable_tensors(ModelFacts.from_config(model.get_base_model().config), setup)
    assert sum(sizes) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert min(sizes) < 4096 <= max(sizes)
    assert optimizer_bytes(sizes, setup) == sum(storages.values())


def _saved_bytes_per_token(model) -> float:
    """Bytes autograd saves inside the first decoder layer per token (slope over two lengths, so
    per-position tables and weights saved for the backward drop out)."""
    layer = model.get_base_model().model.layers[0]
    storages, inside = {}, [False]

    def pack(tensor):
        if inside[0]:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    hooks = [layer.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True)),
             layer.register_forward_hook(lambda *_: inside.__setitem__(0, False))]
    totals = []
    for seq in (64, 128):
        storages.clear()
        ids = torch.randint(3, 300, (2, seq))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(input_ids=ids, labels=ids)
        totals.append(sum(storages.values()))
    for hook in hooks:
        hook.remove()
    return (totals[1] - totals[0]) / (2 * 64)


@pytest.mark.parametrize("kernels", [False, True], ids=["transformers", "kernels"])
def test_layer_activations_match_saved_tensors(tiny_dir, kernels, one_thread):
    model = _load(tiny_dir, kernels=kernels, r=8)
    model.train()
    measured = _saved_bytes_per_token(model)
    setup = RunSetup(batch=1, seq=1, mean_seq=1, compute_bytes=4, device="cpu", kernels=kernels, lora_r=8)
    estimated = layer_activation_bytes(ModelFacts.from_config(model.get_base_model().config), setup, 1)
    # Per-position RoPE tables (cos, sin) are shared by the batch's rows: a few percent at batch 2.
    assert estimated == pytest.approx(measured, rel=0.03)


# Measured on an H100 (bench/README.md, "Training throughput and memory", tuneforge rows):
# peak allocated GiB of `bench/run.py --shape ... --batch B --seq S`.
H100_PEAKS = [("llama-3.2-1b", 4, 2048, 1.878), ("llama-3.1-8b", 2, 2048, 6.606)]


@pytest.mark.parametrize("shape,batch,seq,measured", H100_PEAKS, ids=[p[0] for p in H100_PEAKS])
def test_peak_matches_the_bench_measurements(shape, batch, seq, measured):
    sys.path.insert(0, str(BENCH))
    from shapes import shape_config

    facts = ModelFacts.from_config(shape_config(shape))
    result = estimate(facts, RunSetup(batch=batch, seq=seq, mean_seq=seq), DeviceSpec("H100", 80 * GiB, 989e12, 0.3, ""))
    assert result.peak / GiB == pytest.approx(measured, rel=0.05)
    assert result.host_offloaded == facts.layers * batch * seq * facts.hidden * 2  # offloaded layer inputs
    assert result.fits


def test_estimate_grows_with_batch_and_offload_saves_device_memory():
    sys.path.insert(0, str(BENCH))
    from shapes import shape_config

    facts = ModelFacts.from_config(shape_config("llama-3.2-1b"))
    device = DeviceSpec("H100", 80 * GiB, 989e12, 0.3, "")
    peaks = [estimate(facts, RunSetup(batch=b, seq=2048, mean_seq=2048), device).peak for b in (1, 2, 4, 8)]
    assert peaks == sorted(peaks) and len(set(peaks)) == 4
    offload = estimate(facts, RunSetup(batch=8, seq=8192, mean_seq=8192), device)
    standard = estimate(facts, RunSetup(batch=8, seq=8192, mean_seq=8192, checkpointing="standard"), device)
    assert offload.peak < standard.peak and standard.host_offloaded == 0 < offload.host_offloaded


def _linear_probe(fixed: int, per_unit: int, oom_above: int, calls: list):
    def probe(size: int):
        calls.append(size)
        return None if size > oom_above else fixed + per_unit * size

    return probe


@pytest.mark.parametrize("predicted", [1, 10, 37, 200])
def test_fit_search_finds_the_largest_batch_in_few_probes(predicted):
    calls = []
    # budget 1000: fixed 100 + 23 per row fits 39 rows; the allocator fails beyond 45.
    result = search(_linear_probe(100, 23, 45, calls), predicted, budget=1000)
    assert result.value == 39
    assert len(calls) <= 5
    assert 39 in calls and 40 in calls  # proved from both sides


def test_fit_search_reports_nothing_fits():
    result = search(lambda size: None, 8, budget=1000)
    assert result.value == 0 and "no batch fits" in result.lines()[-1]


def test_fit_search_in_steps_of_256_for_sequence_length():
    calls = []
    result = search(_linear_probe(1000, 3, 10**6, calls), 4096, budget=20000, smallest=256, step=256, what="seq")
    assert result.value == 6144 and all(size % 256 == 0 for size in calls)


def test_fit_on_the_cpu_says_not_applicable(capsys):
    from tuneforge.config import TrainConfig
    from tuneforge.planning.fit import fit

    if torch.cuda.is_available():
        pytest.skip("CUDA present: fit probes the card")
    assert fit(TrainConfig(), plan=None) is None
    assert "not applicable on the CPU" in capsys.readouterr().out


def test_fast_language_model_plan_from_arguments(tiny_dir):
    from tuneforge.fast_language_model import FastLanguageModel

    small = FastLanguageModel.plan(str(tiny_dir), max_seq_length=128, batch_size=1, r=8)
    large = FastLanguageModel.plan(str(tiny_dir), max_seq_length=256, batch_size=4, r=8)
    assert small.setup.seq == 128 and large.setup.batch == 4 and small.lengths is None
    assert small.estimate.peak < large.estimate.peak and small.estimate.trainable_params == large.estimate.trainable_params
    assert any("memory estimate" in line for line in small.lines())


def test_plan_cli_on_the_default_run(capsys, tmp_path):
    from tuneforge.cli import main

    assert main(["plan", "--output", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "data: 160 rows" in out and "peak (tensors)" in out and "s per step" in out
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["lengths"]["p100"] <= 512 and saved["setup"]["batch"] == 2
