"""Padding-free batches through the patched attention's varlen path, for every family that packs.

A padding-free batch carries its sample boundaries (cu_seq_lens_q, max_length_q): the patched
attention then runs kernels/varlen_attention.py per sample, and the causal-LM forward hands
transformers an empty 4-D mask so that no [T, T] block-diagonal mask is built. References:
  - each sample run alone through unpatched transformers (the loss of the packed row is the
    token-weighted mean of the samples' losses), and its gradients;
  - a padded batch through unpatched transformers: `padding_free_batch` turns it into one row
    whose loss and gradients are the padded batch's.
Negative controls: boundaries that merge two samples change the loss; the spy proves the varlen
path ran (and the mask passed down was the empty one), so the equality is not transformers'.

fp32 on the CPU (kernels under the Triton interpreter): loss rtol 1e-5, grads rtol 1e-4.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

import tuneforge.patch.attention as patch_attention
from tuneforge import FastLanguageModel
from tuneforge.data.masking import IGNORE_INDEX
from tuneforge.data.packing import PaddingFreeCollator, pad_to_budget, padding_free_batch
from tuneforge.models.families import all_families, get_family
from tuneforge.testing.tiny import loss_one_by_one, tiny_batch

NO_VARLEN = {"stablelm"}  # StableLmDecoderLayer calls self_attn without **kwargs (transformers 5)
PACKING = sorted(f for f in all_families() if get_family(f).packing and get_family(f).attention == "rope")


def _ours(folder, family):
    model, _ = FastLanguageModel.from_pretrained(str(folder), max_seq_length=64, dtype=torch.float32,
                                                 load_in_4bit=False, use_kernels=True,
                                                 attn_implementation=get_family(family).attn_implementation)
    assert {"rope", "fused_cross_entropy"} <= set(model.tuneforge.kernels)
    return model


def _reference(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _samples(lengths=(6, 11, 3, 8), seed=3):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 200, (n,), generator=generator).tolist()
        labels = list(ids)
        labels[:2] = [IGNORE_INDEX] * 2
        out.append({"input_ids": ids, "labels": labels})
    return out


class _Spy:
    """Counts the patched attention's varlen calls (soft-capped attention: its own varlen kernel)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        for name in ("varlen_attention", "softcap_attention"):
            real = getattr(patch_attention, name)

            def varlen(*args, _real=real, **kwargs):
                self.calls += 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(patch_attention, name, varlen)


@pytest.mark.parametrize("family", PACKING)
def test_varlen_row_equals_the_samples_one_by_one(family, folders, monkeypatch):
    spy = _Spy(monkeypatch)
    ours, reference = _ours(folders(family), family), _reference(folders(family))
    varlen = "varlen" in ours.tuneforge.kernels
    # Where the decoder layer does not hand cu_seq_lens to its attention (StableLM), the patch
    # says so and transformers' block-diagonal mask keeps the samples apart instead.
    assert varlen == (family not in NO_VARLEN), ours.tuneforge.kernels
    features = _samples()
    batch = PaddingFreeCollator()(features)
    packed = ours(**batch).loss
    assert spy.calls == (ours.config.num_hidden_layers if varlen else 0)
    torch.testing.assert_close(packed.double(), loss_one_by_one(reference, features), rtol=1e-5, atol=1e-6)
    # Logits token by token (no labels: the model's own head), a finer check than one mean loss.
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    logits = ours(**unlabelled).logits[0]
    alone = torch.cat([reference(input_ids=torch.tensor([f["input_ids"]])).logits[0] for f in features])
    torch.testing.assert_close(logits, alone, rtol=1e-5, atol=1e-5)
    if not varlen:
        return
    # Negative control: boundaries that merge the first two samples let the second see the first.
    merged = dict(unlabelled, cu_seq_lens_q=batch["cu_seq_lens_q"][[0, 2, 3, 4]], max_length_q=17)
    merged["cu_seq_lens_k"] = merged["cu_seq_lens_q"]
    assert (ours(**merged).logits[0, 6:17] - alone[6:17]).abs().max() > 1e-3


def test_varlen_gradients_equal_the_samples_one_by_one(folders):
    ours, reference = _ours(folders("llama"), "llama"), _reference(folders("llama"))
    features = _samples(seed=4)
    ours(**PaddingFreeCollator()(features)).loss.backward()
    loss_one_by_one(reference, features).backward()
    got = dict(ours.named_parameters())
    for name, parameter in reference.named_parameters():
        torch.testing.assert_close(got[name].grad, parameter.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_no_block_diagonal_mask_is_built(folders, monkeypatch):
    ours = _ours(folders("llama"), "llama")
    seen = []
    for layer in ours.model.layers:
        forward = layer.self_attn.forward

        def spy(*args, _forward=forward, **kwargs):
            seen.append(kwargs.get("attention_mask"))
            return _forward(*args, **kwargs)

        layer.self_attn.forward = spy
    import transformers.masking_utils as masking

    def no_packing_detection(*args, **kwargs):
        raise AssertionError("transformers was asked to detect packing from position_ids")

    monkeypatch.setattr(masking, "find_packed_sequence_indices", no_packing_detection)
    ours(**PaddingFreeCollator()(_samples()))
    assert len(seen) == ours.config.num_hidden_layers
    assert all(m is not None and m.shape == (1, 1, 0, 0) for m in seen)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_becomes_one_row_with_the_same_samples(side):
    ids, mask, labels = tiny_batch(batch=3, seq=9, pad=4)
    if side == "left":
        ids, mask, labels = ids.flip(1), mask.flip(1), labels.flip(1)
    batch = padding_free_batch({"input_ids": ids, "attention_mask": mask, "labels": labels})
    samples = [{"input_ids": ids[i][mask[i].bool()].tolist(), "labels": labels[i][mask[i].bool()].tolist()}
               for i in range(3)]
    expected = PaddingFreeCollator()(samples)
    assert set(batch) == set(expected)
    for key, value in expected.items():
        assert torch.equal(batch[key], value) if torch.is_tensor(value) else batch[key] == value, key


def test_batches_it_does_not_know_pass_through():
    ids, mask, labels = tiny_batch(batch=2, seq=5)
    trl_packed = {"input_ids": ids[:1], "labels": labels[:1], "position_ids": torch.arange(5)[None],
                  "cu_seq_lens_q": torch.tensor([0, 5], dtype=torch.int32)}
    assert padding_free_batch(trl_packed) == trl_packed
    no_labels = {"input_ids": ids, "attention_mask": mask}
    assert padding_free_batch(no_labels) == no_labels
    other = {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": torch.zeros(2, 3)}
    assert padding_free_batch(other) == other


@pytest.mark.parametrize("lengths", [(6, 11, 3, 8), (16, 16)], ids=["filler", "full"])
def test_batch_padded_to_a_budget_keeps_loss_and_gradients(folders, lengths):
    """pad_to_budget (fixed shapes for CUDA graphs): a filler sample and empty samples are added,
    the real samples' loss and every gradient stay those of the samples one by one."""
    ours, reference = _ours(folders("llama"), "llama"), _reference(folders("llama"))
    features = _samples(lengths=lengths, seed=5)
    batch = pad_to_budget(PaddingFreeCollator()(features), longest=16, samples_multiple=8)
    tokens = -(-sum(lengths) // 16) * 16
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, tokens)
    assert batch["cu_seq_lens_q"].shape == (9,) and batch["max_length_q"] == 16
    assert batch["cu_seq_lens_q"][-1] == tokens
    assert (batch["labels"][0, sum(lengths):] == IGNORE_INDEX).all()
    ours(**batch).loss.backward()
    want = loss_one_by_one(reference, features)
    want.backward()
    params = dict(ours.named_parameters())
    for name, parameter in reference.named_parameters():
        torch.testing.assert_close(params[name].grad, parameter.grad, rtol=1e-4, atol=1e-6, msg=name)
    # Token by token: the real samples' logits are those of each sample alone.
    if tokens > sum(lengths):
        unlabelled = {k: v for k, v in batch.items() if k != "labels"}
        kept = ours(**unlabelled).logits[0, :sum(lengths)]
        alone = torch.cat([reference(input_ids=torch.tensor([f["input_ids"]])).logits[0] for f in features])
        torch.testing.assert_close(kept, alone, rtol=1e-5, atol=1e-5)


def test_pad_to_budget_refuses_longer_samples():
    batch = PaddingFreeCollator()(_samples(lengths=(20, 3)))
    with pytest.raises(ValueError, match="longer than longest=16"):
        pad_to_budget(batch, longest=16)


def test_padded_batch_loss_and_grads_unchanged(folders):
    ours, reference = _ours(folders("qwen2"), "qwen2"), _reference(folders("qwen2"))
    ids, mask, labels = tiny_batch(batch=3, seq=9, pad=4, seed=2)
    want = reference(input_ids=ids, attention_mask=mask, labels=labels)
    want.loss.backward()
    got = ours(**padding_free_batch({"input_ids": ids, "attention_mask": mask, "labels": labels})).loss
    got.backward()
    torch.testing.assert_close(got, want.loss, rtol=1e-5, atol=1e-6)
    params = dict(ours.named_parameters())
    for name, parameter in reference.named_parameters():
        torch.testing.assert_close(params[name].grad, parameter.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_sft_trainer_makes_batches_padding_free_only_for_the_patched_attention(folders, tmp_path):
    from datasets import Dataset

    from tuneforge import SFTConfig, SFTTrainer
    from tuneforge.train.trainer import PaddingFreeBatches

    data = Dataset.from_list(_samples())
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to="none")
    for use_kernels in (True, False):
        model, _ = FastLanguageModel.from_pretrained(str(folders("llama")), max_seq_length=64, dtype=torch.float32,
                                                     load_in_4bit=False, use_kernels=use_kernels)
        model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj", "v_proj"])
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=_tokenizer())
        assert isinstance(trainer.data_collator, PaddingFreeBatches) == use_kernels
        batch = next(iter(trainer.get_train_dataloader()))
        assert ("cu_seq_lens_q" in batch) == use_kernels and ("attention_mask" in batch) != use_kernels


def _tokenizer():
    """A word-level tokenizer over the tiny vocabulary: the data is pre-tokenized, the trainer only reads pad/eos."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(317)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                   pad_token="t0", eos_token="t2")


def test_trainer_on_batches_padded_to_a_budget_trains_the_same(folders, tmp_path):
    """What the graphed trainer steps feed (PaddingFreeBatches with a budget), run eagerly on the
    CPU: the same losses and adapter as unpadded batches, and num_tokens counts real tokens only."""
    from datasets import Dataset

    from tuneforge import SFTConfig, SFTTrainer
    from tuneforge.train.trainer import PaddingFreeBatches

    data = Dataset.from_list(_samples(lengths=(6, 11, 3, 8, 9, 5), seed=6))
    runs = []
    for longest in (None, 16):
        args = SFTConfig(output_dir=str(tmp_path / str(longest)), max_steps=3, per_device_train_batch_size=2,
                         report_to="none", logging_steps=1, learning_rate=1e-2, max_length=16, seed=1)
        model, _ = FastLanguageModel.from_pretrained(str(folders("llama")), max_seq_length=64, dtype=torch.float32,
                                                     load_in_4bit=False, use_kernels=True)
        model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj", "v_proj"], random_state=0)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=_tokenizer())
        trainer.data_collator = PaddingFreeBatches(trainer.data_collator.collator, longest)
        if longest:
            batch = next(iter(trainer.get_train_dataloader()))
            assert batch["input_ids"].shape[1] % longest == 0 and batch["max_length_q"] == longest
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        tokens = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]
        adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        runs.append((losses, tokens, adapter))
    (plain_losses, plain_tokens, plain), (padded_losses, padded_tokens, padded) = runs
    assert padded_losses == pytest.approx(plain_losses, rel=1e-5)
    assert padded_tokens == plain_tokens and plain_tokens[-1] == sum((6, 11, 3, 8, 9, 5))
    for name, value in plain.items():
        torch.testing.assert_close(padded[name], value, rtol=1e-4, atol=1e-6, msg=name)
