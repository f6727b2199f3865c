"""Turning (prompt, answer) pairs into token ids with the loss on the answer only."""

from __future__ import annotations

from dataclasses import dataclass

from lightning_qlora.metrics import IGNORE_INDEX


@dataclass
class Encoded:
    """One tokenized example; ``truncated`` tells whether it was cut to ``max_length``."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool


def prompt_text(tokenizer, prompt: str, system: str | None = None) -> str:
    """The text the model sees before its answer: the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return (f"{system}\n\n" if system else "") + f"{prompt}\n"


def encode_pair(tokenizer, prompt: str, answer: str, max_length: int, system: str | None = None) -> Encoded:
    """Token ids of prompt + answer, labels ``-100`` on the prompt; cut at ``max_length``.

    The answer ends with the tokenizer's end-of-turn token (EOS), so that a trained
    model learns to stop.
    """
    head = tokenizer(prompt_text(tokenizer, prompt, system), add_special_tokens=False)["input_ids"]
    tail = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        tail = tail + [tokenizer.eos_token_id]
    ids = head + tail
    labels = [IGNORE_INDEX] * len(head) + tail
    truncated = len(ids) > max_length
    return Encoded(ids[:max_length], labels[:max_length], truncated)
