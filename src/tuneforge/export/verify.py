"""Every export proves itself: the artefact, loaded the way its users will load it, against the model
it came from, on a few prompts from the training data.

    report = verify_exports(reference, [("merged_16bit", out)], out)   # prints one line per artefact

Per artefact:
  logits     the reference greedily continues each prompt (16 tokens); the artefact runs the same
             ids (prompt + continuation, one teacher-forced pass) and the largest |difference| of
             the logits at the reference's 10 most likely tokens of every position is taken,
             relative to the reference's largest |logit|;
  greedy     the artefact's argmax at every continuation step equals the reference's token, or the
             step is a near-tie (the reference's own margin is within the tolerance), where two
             correct runs may part;
  template   GGUF: the chat template stored in the file, rendered and tokenized by llama.cpp (or the
             HF tokenizer without it), gives the training template's tokens for a sample
             conversation; Ollama: the Modelfile's TEMPLATE (Go syntax), with its SYSTEM line and the
             GGUF's BOS flag, gives them too.

How an artefact is loaded: adapter -> peft's `load_adapter` beside the reference's own adapter (the
same base weights, so any difference is the saved file's); merged_16bit / merged_4bit ->
transformers `from_pretrained` (bitsandbytes NF4 for 4-bit); GGUF -> llama.cpp
(llama-cpp-python, when installed; without it the logit check is skipped and said so).

Tolerances (relative to the reference's largest |logit|) follow the artefact's precision: an adapter
must match to 1e-3, 16-bit weights to 5%, 8-bit to 10%, 4-bit to 35% (NF4 / Q4 rounding of every
weight moves logits by that much on small models; their greedy text is reported, not enforced).
`tuneforge export` compares merges (16-bit folders, GGUFs) with the 16-bit base + adapter (what
the merge computes) and, after a QLoRA run, the merged 4-bit folder with the NF4 base + adapter
(the model as trained, which bitsandbytes' re-quantisation of the merge lands next to).
The report goes to `export_report.json` beside the artefact; a failure raises ExportVerificationError.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tuneforge.export.ollama import render_go_template

log = logging.getLogger(__name__)

REPORT_NAME = "export_report.json"
NEW_TOKENS = 16
TOP_K = 10  # logits compared at the reference's 10 most likely tokens of every position
TOLERANCE = {"adapter": 1e-3, "merged_16bit": 0.05, "f32": 1e-3, "f16": 0.05, "bf16": 0.05, "q8_0": 0.10}
LOW_BIT_TOLERANCE = 0.35  # merged_4bit and 4-6-bit GGUF quants
FALLBACK_PROMPTS = ["What is the capital of France?", "Write one sentence about the sea.",
                    "Name three primary colours."]
SAMPLE_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
]


class ExportVerificationError(RuntimeError):
    """An exported artefact does not behave like the model it came from; the message says how far off."""


@dataclass
class Check:
    artefact: str  # "adapter", "merged_16bit", "merged_4bit", "gguf Q8_0", "ollama"
    path: str
    passed: bool = True
    max_logit_diff: float | None = None
    relative_diff: float | None = None
    tolerance: float | None = None
    greedy_agreed: int | None = None
    greedy_steps: int | None = None
    template: str | None = None  # "same tokens", or where the serving side's tokens differ
    notes: list[str] = field(default_factory=list)
    skipped: bool = False  # nothing could be checked (said in notes); not a failure

    def fail(self, why: str) -> None:
        self.passed = False
        self.notes.append(why)

    def line(self) -> str:
        parts = []
        if self.max_logit_diff is not None:
            parts.append(f"max |dlogit| {self.max_logit_diff:.4g} ({100 * self.relative_diff:.2f}% of the largest "
                         f"logit, tolerance {100 * self.tolerance:.1f}%)")
        if self.greedy_steps is not None:
            parts.append(f"greedy {self.greedy_agreed}/{self.greedy_steps} tokens")
        if self.template is not None:
            parts.append(f"template: {self.template}")
        parts += self.notes
        status = "FAIL" if not self.passed else "SKIP" if self.skipped else "PASS"
        return f"{status} {self.artefact:<14} {self.path}: {'; '.join(parts)}"


@dataclass
class ExportReport:
    checks: list[Check] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def lines(self) -> list[str]:
        return [check.line() for check in self.checks]

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / REPORT_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"passed": self.passed, "prompts": self.prompts,
                                    "checks": [asdict(check) for check in self.checks]}, indent=2))
        return path

    def raise_on_failure(self) -> None:
        failed = [check.line() for check in self.checks if not check.passed]
        if failed:
            raise ExportVerificationError("export verification failed:\n  " + "\n  ".join(failed))


# ---------------------------------------------------------------------------------------------
# The reference: the model the export came from, greedy continuations cached once
# ---------------------------------------------------------------------------------------------


@dataclass
class _Case:
    ids: list[int]  # prompt
    continuation: list[int]
    logits: torch.Tensor  # [len(ids) + len(continuation) - 1 .. positions predicting each next token, vocab]


class Reference:
    """A model (peft or plain) and its tokenizer; `cases` are its greedy continuations of `prompts`."""

    def __init__(self, model, tokenizer, prompts: list | None = None, new_tokens: int = NEW_TOKENS):
        self.model, self.tokenizer = model, tokenizer
        self.conversations = [_as_messages(p) for p in (prompts or FALLBACK_PROMPTS)]
        self.prompts = [messages[-1]["content"] for messages in self.conversations]
        self.new_tokens = new_tokens
        self.label: str | None = None  # what the reference is, when it is not the in-memory model
        self._cases: list[_Case] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prompt_ids(self, messages) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(messages[-1]["content"])["input_ids"]

    @property
    def cases(self) -> list[_Case]:
        if self._cases is None:
            self._cases = []
            for messages in self.conversations:
                ids = self.prompt_ids(messages)
                continuation = _greedy(self.model, ids, self.new_tokens, self.tokenizer.eos_token_id)
                self._cases.append(_Case(ids, continuation, _hf_logits(self.model, ids + continuation)))
        return self._cases


def _as_messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


@torch.no_grad()
def _hf_logits(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] fp32 CPU logits of a transformers / peft model."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu()
    model.train(was_training)
    return logits


def _greedy(model, ids: list[int], count: int, eos: int | None) -> list[int]:
    """Greedy continuation by repeated full forwards (no cache: the same path the checks run)."""
    out: list[int] = []
    for _ in range(count):
        token = int(_hf_logits(model, ids + out)[-1].argmax())
        out.append(token)
        if token == eos:
            break
    return out


def compare(reference: Reference, run, check: Check, tolerance: float) -> None:
    """Run the artefact (`run(ids) -> [len(ids), vocab] logits`) on every case; fill `check`."""
    largest, worst, agreed, steps = 0.0, 0.0, 0, 0
    parted = []
    for case in reference.cases:
        ids = case.ids + case.continuation
        got = torch.as_tensor(run(ids), dtype=torch.float32)[: len(ids)]
        want = case.logits
        if got.shape != want.shape:
            check.fail(f"logits of shape {tuple(got.shape)}, expected {tuple(want.shape)}")
            return
        largest = max(largest, float(want.abs().max()))
        # Over the reference's top tokens at each position: the ones generation can pick. Far-down
        # logits of a 50k+ vocabulary move most under quantisation and never matter.
        top = want.topk(min(TOP_K, want.shape[-1]), dim=-1).indices
        worst = max(worst, float((got.gather(-1, top) - want.gather(-1, top)).abs().max()))
        base = len(case.ids) - 1  # the position that predicts the first continuation token
        for step, token in enumerate(case.continuation):
            steps += 1
            chosen = int(got[base + step].argmax())
            if chosen == token:
                agreed += 1
                continue
            # The reference's own margin between its token and the artefact's: a near-tie parts runs.
            margin = float(want[base + step, token] - want[base + step, chosen])
            parted.append((step, margin))
            steps += len(case.continuation) - step - 1
            break
    check.max_logit_diff, check.tolerance = worst, tolerance
    check.relative_diff = worst / largest if largest else 0.0
    check.greedy_agreed, check.greedy_steps = agreed, steps
    if check.relative_diff > tolerance:
        check.fail(f"logits differ by {100 * check.relative_diff:.2f}% (> {100 * tolerance:.1f}%)")
    strict = tolerance < LOW_BIT_TOLERANCE  # 4-bit rounding may change a small model's greedy text
    for step, margin in parted:
        if strict and margin > tolerance * largest:
            check.fail(f"greedy text parts at step {step} where the reference prefers its token by {margin:.3g} "
                       "(not a near-tie)")
            break
    else:
        if parted:
            check.notes.append(f"greedy text parts at {len(parted)} near-tie(s)" if strict else
                               f"greedy text parts in {len(parted)} prompt(s) (not enforced at 4-bit)")


# ---------------------------------------------------------------------------------------------
# Artefact runners
# ---------------------------------------------------------------------------------------------


def _tolerance(kind: str) -> float:
    return TOLERANCE.get(kind, LOW_BIT_TOLERANCE)


def check_adapter(reference: Reference, folder: Path) -> Check:
    """The saved adapter, loaded by peft beside the reference's own (same base weights)."""
    check = Check("adapter", str(folder))
    model = reference.model
    if not hasattr(model, "load_adapter"):
        check.fail("the reference is not a peft model: nothing to load the adapter into")
        return check
    active = model.active_adapter
    try:
        model.load_adapter(str(folder), adapter_name="tuneforge_verify")
    except Exception as error:  # a missing or mismatched tensor: the check's failure, with peft's words
        check.fail(f"peft cannot load it: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        return check
    try:
        def run(ids):
            model.set_adapter("tuneforge_verify")
            try:
                return _hf_logits(model, ids)
            finally:
                model.set_adapter(active)

        compare(reference, run, check, _tolerance("adapter"))
    finally:
        model.set_adapter(active)  # peft marks the active adapter trainable again
        model.delete_adapter("tuneforge_verify")
    return check


def check_merged(reference: Reference, folder: Path, kind: str) -> Check:
    """A merged folder through transformers' from_pretrained (bitsandbytes NF4 for merged_4bit)."""
    from transformers import AutoModelForCausalLM

    check = Check(kind, str(folder))
    try:
        kwargs = {} if kind == "merged_4bit" else {"dtype": torch.float32}
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except Exception as error:
        check.fail(f"transformers cannot load it: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        return check
    _no_cpu_repack(model)
    try:
        compare(reference, lambda ids: _hf_logits(model, ids), check, _tolerance(kind))
    finally:
        del model
    return check


def gguf_kind(path: Path) -> str:
    """"q8_0" from "model.Q8_0.gguf"."""
    return path.name.rsplit(".", 2)[-2].lower() if path.name.count(".") >= 2 else "gguf"


def check_gguf(reference: Reference, path: Path) -> Check:
    """llama.cpp's logits (when llama-cpp-python is installed) and the stored chat template's tokens."""
    kind = gguf_kind(path)
    check = Check(f"gguf {kind.upper()}", str(path))
    llm = _llama(path)
    try:
        if llm is None:
            check.notes.append("logits not checked: llama-cpp-python is not installed (pip install 'tuneforge[gguf]')")
        else:
            def run(ids):
                llm.reset()
                llm.eval(ids)
                import numpy as np

                return np.array(llm.scores[: len(ids)])

            compare(reference, run, check, _tolerance(kind))
        _check_gguf_template(reference.tokenizer, path, llm, check)
    finally:
        if llm is not None:
            llm.close()
    return check


def _llama(path: Path):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    # One thread: ggml's workers spin while waiting, slower than one on a shared CPU.
    return Llama(model_path=str(path), n_ctx=1024, logits_all=True, verbose=False, n_threads=1)


def gguf_metadata(path: Path) -> dict:
    """The GGUF's key/values that the template checks need (string or bool values only)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    wanted = ("tokenizer.chat_template", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.bos_token_id",
              "tokenizer.ggml.eos_token_id")
    out = {}
    for key in wanted:
        field_ = reader.fields.get(key)
        if field_ is None:
            continue
        value = field_.parts[field_.data[0]]
        out[key] = bytes(value).decode() if key == "tokenizer.chat_template" else value.tolist()[0]
    return out


def training_ids(tokenizer, conversation=SAMPLE_CONVERSATION) -> list[int]:
    """The token ids the training template gives a conversation, with the generation prompt."""
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _first_difference(got: list[int], want: list[int], tokenizer) -> str:
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return (f"differs at token {i}: serving {tokenizer.decode(got[i:i + 4])!r} vs training "
                    f"{tokenizer.decode(want[i:i + 4])!r}")
    return f"{len(got)} tokens served vs {len(want)} trained"


def _check_gguf_template(tokenizer, path: Path, llm, check: Check) -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    if not getattr(tokenizer, "chat_template", None):
        check.template = "not checked (the tokenizer has no chat template)"
        return
    meta = gguf_metadata(path)
    stored = meta.get("tokenizer.chat_template")
    if not stored:
        check.template = "missing from the GGUF"
        check.fail("the GGUF carries no chat template: servers would fall back to a default one")
        return
    rendered = render_jinja_template(conversations=[SAMPLE_CONVERSATION], chat_template=stored,
                                     add_generation_prompt=True, bos_token=tokenizer.bos_token or "",
                                     eos_token=tokenizer.eos_token or "")[0][0]
    if llm is not None:
        served = llm.tokenize(rendered.encode(), add_bos=False, special=True)
    else:
        served = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    want = training_ids(tokenizer)
    if served == want:
        check.template = f"same {len(want)} tokens"
    else:
        check.template = _first_difference(served, want, tokenizer)
        check.fail("the GGUF's chat template renders other tokens than training")


# ---------------------------------------------------------------------------------------------
# Ollama: the Modelfile's TEMPLATE, rendered as Ollama's Go templates would
# ---------------------------------------------------------------------------------------------

# Ollama: the Modelfile's TEMPLATE is rendered by export.ollama.render_go_template, kept beside the
# code that writes the templates (one Go-template subset, one renderer).


def parse_modelfile(path: Path) -> dict:
    """FROM, TEMPLATE, SYSTEM and PARAMETER stop lines of a Modelfile."""
    text = path.read_text()
    out: dict = {"stop": []}
    for key in ("TEMPLATE", "SYSTEM"):
        found = re.search(rf'^{key} """(.*?)"""', text, re.S | re.M)
        if found:
            out[key.lower()] = found.group(1)
    found = re.search(r"^FROM (.+)$", text, re.M)
    out["from"] = found.group(1).strip() if found else None
    out["stop"] = re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)
    return out


def check_modelfile(tokenizer, path: Path) -> Check:
    """The Modelfile's TEMPLATE (+ SYSTEM, + BOS per the GGUF's flag) renders the training tokens."""
    check = Check("ollama", str(path))
    modelfile = parse_modelfile(path)
    if "template" not in modelfile:
        check.template = "no TEMPLATE: Ollama reads the GGUF's template"
        check.notes.append("Ollama falls back to the GGUF's own template (checked with the GGUF)")
        return check
    conversation = [m for m in SAMPLE_CONVERSATION if m["role"] != "system"]
    try:
        rendered = render_go_template(modelfile["template"], conversation, modelfile.get("system"))
    except ValueError as error:
        check.template = f"cannot render: {error}"
        check.fail("the Modelfile TEMPLATE uses constructs the check cannot render")
        return check
    served = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    gguf_file = path.parent / (modelfile["from"] or "").removeprefix("./")
    if gguf_file.is_file() and gguf_metadata(gguf_file).get("tokenizer.ggml.add_bos_token"):
        served = [tokenizer.bos_token_id, *served]
    want = training_ids(tokenizer, conversation)
    if served == want:
        check.template = f"same {len(want)} tokens (default SYSTEM included)" if modelfile.get("system") \
            else f"same {len(want)} tokens"
    else:
        check.template = _first_difference(served, want, tokenizer)
        check.fail("Ollama would send the model other tokens than it was trained on")
    eot = getattr(tokenizer, "eos_token", None)
    if eot and modelfile["stop"] and eot not in modelfile["stop"]:
        check.fail(f"PARAMETER stop does not include the end-of-turn token {eot!r}")
    return check


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def verify_exports(reference, artefacts: list[tuple[str, Path]], report_folder: str | Path,
                   raise_on_failure: bool = True) -> ExportReport:
    """Check each (kind, path): kind "adapter" | "merged_16bit" | "merged_4bit" | "gguf" | "ollama".
    Prints one line per artefact, writes export_report.json into `report_folder`, raises on failure.

    reference: a Reference, or a function (kind, path) -> Reference (the folder export compares
    4-bit artefacts with the model as trained, NF4 base, and 16-bit ones with the 16-bit base).
    """
    pick = reference if callable(reference) else (lambda kind, path: reference)
    report = ExportReport()
    for kind, path in artefacts:
        path = Path(path)
        reference = pick(kind, path)
        report.prompts = report.prompts or reference.prompts
        if kind == "adapter":
            check = check_adapter(reference, path)
        elif kind in ("merged_16bit", "merged_4bit"):
            check = check_merged(reference, path, kind)
        elif kind == "gguf":
            check = check_gguf(reference, path)
        elif kind == "ollama":
            check = check_modelfile(reference.tokenizer, path)
        else:
            raise ValueError(f"unknown artefact kind {kind!r}")
        if reference.label and kind != "ollama":
            check.notes.append(f"vs {reference.label}")
        report.checks.append(check)
        print(check.line(), flush=True)
    written = report.write(report_folder)
    log.info("export report written to %s", written)
    if raise_on_failure:
        report.raise_on_failure()
    return report


def artefacts_of(kind: str, paths: list[Path]) -> list[tuple[str, Path]]:
    """An export's written paths -> the (kind, path) pairs to check (GGUF files and their Modelfile)."""
    if kind in ("lora", "adapter"):
        return [("adapter", paths[0])]
    if kind in ("merged_16bit", "merged_4bit"):
        return [(kind, paths[0])]
    return [("ollama" if path.name == "Modelfile" else "gguf", path) for path in paths]


def training_prompts(run_folder: str | Path | None, count: int = 3) -> list | None:
    """Up to `count` prompts (the conversation before the last assistant turn) from the training
    data named in a run folder's config.resolved.json; None when there is no such run folder."""
    if run_folder is None:
        return None
    resolved = Path(run_folder) / "config.resolved.json"
    if not resolved.is_file():
        return None
    from tuneforge.data.formats import to_conversations
    from tuneforge.data.loading import load_records
    from tuneforge.data.sources import dataset_source

    data = json.loads(resolved.read_text())["config"]["data"]
    try:
        records, _ = load_records(dataset_source(data["path"]), split=data.get("split", "train"))
        rows, detected = to_conversations(records.select(range(min(count, len(records)))), data.get("format", "auto"),
                                          data.get("field_map"))
    except Exception as error:  # the data may have moved since training: fall back, say so
        log.warning("export check: training data not readable (%s); using built-in prompts", error)
        return None
    if detected == "text":
        return None
    prompts = []
    for messages in rows["messages"]:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompts.append([{"role": m["role"], "content": m["content"]} for m in messages[:last]])
    return prompts or None


def reference_from_files(adapter_dir: Path, base_dir: Path, tokenizer, prompts=None, nf4: bool = False) -> Reference:
    """The trained model as its files hold it: the base checkpoint with the adapter by peft, on the
    CPU in fp32; nf4=True loads the base in NF4 (double-quantised) as a QLoRA run trained it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32) if nf4 else None
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, quantization_config=quantization)
    _no_cpu_repack(base)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    reference = Reference(model, tokenizer, prompts)
    reference.label = "NF4 base + adapter, as trained" if nf4 else "16-bit base + adapter"
    return reference


def _no_cpu_repack(model) -> None:
    from tuneforge.integration.bnb import prepare

    # As tuneforge's loader (integration/bnb.py): bitsandbytes' in-place AVX512-BF16 repack off, and
    # its wrong CPU dequantisation of rows that are not whole blocks replaced by the NF4 formula.
    prepare(model)


def _trained_in_4bit(run_folder: Path) -> bool:
    resolved = run_folder / "config.resolved.json"
    if not resolved.is_file():
        return False
    model = json.loads(resolved.read_text())["config"]["model"]
    return bool(model.get("load_in_4bit")) and not model.get("full_finetuning")


def verify_in_memory(model, tokenizer, kind: str, paths: list[Path], prompts=None) -> ExportReport:
    """The in-memory exports' check (save_pretrained_merged / save_pretrained_gguf)."""
    if tokenizer is None:
        log.warning("export check skipped: no tokenizer was passed, so no prompt can be built")
        return ExportReport()
    from tuneforge.integration.bnb import exact_forwards

    folder = paths[0] if paths[0].is_dir() else paths[0].parent
    # The reference is the model's exact function, not bitsandbytes' bf16 CPU gemm after for_inference.
    with exact_forwards(model):
        return verify_exports(Reference(model, tokenizer, prompts), artefacts_of(kind, paths), folder)


def verify_folder_export(adapter: str | Path, fmt: str, paths: list[Path], output: str | Path,
                         base: str | Path | None = None) -> ExportReport:
    """`tuneforge export`'s check: the trained model as its files hold it (base + adapter through
    peft, fp32 on the CPU) against each written artefact, on prompts from the run's training data
    (the run folder's config.resolved.json, when the adapter lies in one)."""
    from tuneforge.export.adapter import LoraAdapter
    from tuneforge.export.adapter import adapter_folder, load_tokenizer
    from tuneforge.export.merge import resolve_base

    adapter_dir = adapter_folder(adapter)
    base_dir = resolve_base(LoraAdapter.load(adapter_dir), base)
    if not any((folder / name).is_file() for folder in (adapter_dir, base_dir)
               for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        check = Check(fmt, str(output), skipped=True, notes=["not checked: neither the adapter nor the base folder has a "
                                               "tokenizer to build prompts with"])
        print(check.line(), flush=True)
        report = ExportReport([check])
        report.write(output)
        return report
    tokenizer = load_tokenizer(adapter_dir, base_dir)
    prompts = training_prompts(adapter_dir.parent) or training_prompts(adapter_dir)
    if prompts is None:
        log.info("export check: no run folder beside %s; built-in prompts", adapter_dir)
    artefacts = artefacts_of(fmt, [Path(p) for p in paths])
    if fmt == "adapter":
        # The reference already carries the original adapter under "default": the copy loads beside it.
        artefacts = [("adapter", Path(output))]
    # Merges (16-bit folders, GGUFs) add the adapter to the 16-bit base: compare with that. The
    # merged 4-bit export re-quantises it to NF4 with bitsandbytes' rounding, which lands next to
    # the NF4 base a QLoRA run trained on (measured on SmolLM2-135M: 9% of the largest logit from
    # it, 45% from the 16-bit base): compare that one with the model as trained.
    qlora = _trained_in_4bit(adapter_dir.parent) or _trained_in_4bit(adapter_dir)
    references: dict[bool, Reference] = {}

    def pick(kind: str, path: Path) -> Reference:
        nf4 = qlora and kind == "merged_4bit"
        if nf4 not in references:
            references[nf4] = reference_from_files(adapter_dir, base_dir, tokenizer, prompts, nf4=nf4)
        return references[nf4]

    return verify_exports(pick, artefacts, output)
