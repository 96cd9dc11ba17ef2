"""`tuneforge chat`: load a trained adapter (or a model) and talk to it, tokens streamed."""

from __future__ import annotations

import sys

from tuneforge.fast_language_model import load_for_inference


def respond(model, tokenizer, messages, max_new_tokens: int = 256, stream: bool = True) -> str:
    """Greedy answer to `messages` (chat template applied), streamed to stdout when `stream`.

    `model` comes from `load_for_inference`, so `generate` is for_inference's static-cache loop (CUDA
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
    loaded, tokenizer = load_for_inference(model, load_in_4bit=load_in_4bit)
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
