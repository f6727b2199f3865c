"""Greedy generation from a (quantized, adapted) causal LM, for quick looks at answers."""

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
