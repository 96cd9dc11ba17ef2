"""`tuneforge chat`: load a trained adapter (or a model) and talk to it, tokens streamed."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _sequence_length(folder: Path, fallback: int = 2048) -> int:
    """The max_seq_length to load with, so that RoPE is set up as in training: an adapter's
    tokenizer carries the training max_seq_length (the loader sets model_max_length to it); a
    model folder gets its own max_position_embeddings (a larger value would rescale RoPE)."""
    for name, key in (("tokenizer_config.json", "model_max_length"), ("config.json", "max_position_embeddings")):
        file = folder / name
        if file.is_file():
            value = json.loads(file.read_text()).get(key)
            if isinstance(value, int) and 0 < value < 10**7:  # tokenizers without a limit store ~1e30
                return value
    return fallback


def load_for_chat(model: str, load_in_4bit: bool = True):
    """(model, tokenizer) for a run folder, an adapter folder, a model folder or a shipped name."""
    from tuneforge.fast_language_model import FastLanguageModel

    path = Path(model)
    if (path / "adapter" / "adapter_config.json").is_file():  # a `tuneforge train` output folder
        path = path / "adapter"
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        from tuneforge.export.command import adapter_problem
        from tuneforge.models.loader import ModelLoadError

        problem = adapter_problem(path)
        if problem:
            raise ModelLoadError(problem)

        base_name = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        length = _sequence_length(path, fallback=_sequence_length(Path(base_name)))
        base, tokenizer = FastLanguageModel.from_pretrained(base_name, load_in_4bit=load_in_4bit,
                                                            max_seq_length=length)
        if (path / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
        loaded = PeftModel.from_pretrained(base, path)
        return FastLanguageModel.for_inference(loaded), tokenizer
    loaded, tokenizer = FastLanguageModel.from_pretrained(model, load_in_4bit=load_in_4bit,
                                                          max_seq_length=_sequence_length(path))
    return FastLanguageModel.for_inference(loaded), tokenizer


def respond(model, tokenizer, messages, max_new_tokens: int = 256, stream: bool = True) -> str:
    """Greedy answer to `messages` (chat template applied), streamed to stdout when `stream`.

    `model` comes from `load_for_chat`, so `generate` is for_inference's static-cache loop (CUDA
    graph decode steps on a GPU); the streamer gets each token as it is chosen.
    """
    import torch
    from transformers import TextStreamer

    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    device = next(model.parameters()).device
    inputs = {key: value.to(device) for key, value in inputs.items()}
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                                pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def chat(model: str, prompt: str | None = None, max_new_tokens: int = 256, system: str | None = None,
         load_in_4bit: bool = True) -> int:
    loaded, tokenizer = load_for_chat(model, load_in_4bit=load_in_4bit)
    messages = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        respond(loaded, tokenizer, messages + [{"role": "user", "content": prompt}], max_new_tokens)
        return 0
    print("tuneforge chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        answer = respond(loaded, tokenizer, messages, max_new_tokens)
        messages.append({"role": "assistant", "content": answer})
    return 0
