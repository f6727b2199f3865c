"""Turning (prompt, answer) pairs into token ids with the loss on the answer only."""

from __future__ import annotations

from dataclasses import dataclass

from lightning_qlora.metrics import IGNORE_INDEX


@dataclass
class Encoded:
    """One tokenized example; ``truncated`` tells whether it was cut to ``max_length``.

    For choice scoring, ``choice_ids`` holds the first token of each option and
    ``choice_label`` the index of the right one; the answer begins at ``answer_start``.
    """

    input_ids: list[int]
    labels: list[int]
    truncated: bool
    answer_start: int = -1
    choice_ids: list[int] | None = None
    choice_label: int = -1


def choice_token_ids(tokenizer, choices: list[str]) -> list[int]:
    """The first token of each option; they must differ, since the option is scored by it."""
    ids = [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in choices]
    if len(set(ids)) != len(ids):
        raise ValueError(
            f"The options {choices} do not start with distinct tokens under this tokenizer, so they cannot be"
            " scored by likelihood; use options whose first tokens differ."
        )
    return ids


def prompt_text(tokenizer, prompt: str, system: str | None = None) -> str:
    """The text the model sees before its answer: the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return (f"{system}\n\n" if system else "") + f"{prompt}\n"


def encode_pair(
    tokenizer,
    prompt: str,
    answer: str,
    max_length: int,
    system: str | None = None,
    choices: list[str] | None = None,
    gold: int = -1,
) -> Encoded:
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
    enc = Encoded(ids[:max_length], labels[:max_length], truncated, answer_start=len(head))
    if choices is not None:
        enc.choice_ids = choice_token_ids(tokenizer, choices)
        enc.choice_label = gold
        if tail[0] != enc.choice_ids[gold]:
            raise ValueError(
                f"The answer {answer[:40]!r} does not start with the token of its option {choices[gold]!r};"
                " the task's answers must begin with the option text."
            )
    return enc
