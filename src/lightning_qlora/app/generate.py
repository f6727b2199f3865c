"""Greedy generation from a (quantized, adapted) causal LM: the run's sample answers and
``lightning-qlora generate``."""

from __future__ import annotations

import torch

from lightning_qlora.tasks.data.formatting import prompt_text


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, system: str | None = None) -> str:
    """The model's greedy answer to ``prompt``, formatted with the chat template as in training."""
    device = next(model.parameters()).device
    text = prompt_text(tokenizer, prompt, system)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
        )
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


@torch.no_grad()
def stream_answers(
    prompts: list[str], adapter: str | None, base: str | None, max_new_tokens: int, system: str | None = None
) -> None:
    """Print each prompt and stream the greedy answer of ``base`` (+ ``adapter``, on the base quantized as
    it was in training) to stdout; ``base`` defaults to the adapter's, else the embedded default."""
    from transformers import TextStreamer

    from lightning_qlora.core.adapters import load_adapters
    from lightning_qlora.io.export import read_metadata
    from lightning_qlora.io.merge import load_base
    from lightning_qlora.io.models import DEFAULT_MODEL, load_model, load_tokenizer

    if adapter:
        meta = read_metadata(adapter)
        base = base or meta.get("base_model") or DEFAULT_MODEL
        model = load_base(base, meta)
        load_adapters(model, adapter)
    else:
        base = base or DEFAULT_MODEL
        model = load_model(base)
    tokenizer = load_tokenizer(base)
    model.eval()
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    for prompt in prompts:
        print(f">>> {prompt}", flush=True)
        inputs = tokenizer(prompt_text(tokenizer, prompt, system), return_tensors="pt", add_special_tokens=False)
        model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id,
        )
