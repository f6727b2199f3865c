"""Turning (prompt, answer) pairs into token ids with the loss on the answer only."""

from __future__ import annotations

from dataclasses import dataclass

from lightning_qlora.tasks.metrics import IGNORE_INDEX


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
    choice_seqs: list[list[int]] | None = None  # whole options, for sequence scoring
    doc_lengths: list[int] | None = None  # set on packed rows: the lengths of the examples in it


def pack(examples: list[Encoded], max_length: int) -> list[Encoded]:
    """Greedily pack examples, in order, into rows of at most ``max_length`` tokens.

    Each packed row records its examples' lengths, from which the collator builds
    position ids that restart per example and a block-diagonal causal mask, so that
    an example never attends to its neighbours.
    """
    rows: list[Encoded] = []
    for e in examples:
        last = rows[-1] if rows else None
        if last is not None and len(last.input_ids) + len(e.input_ids) <= max_length:
            last.input_ids = last.input_ids + e.input_ids
            # An example's first token has no context; never score it from the previous one.
            last.labels = last.labels + [IGNORE_INDEX] + e.labels[1:]
            last.doc_lengths.append(len(e.input_ids))
            last.truncated = last.truncated or e.truncated
        else:
            rows.append(Encoded(list(e.input_ids), list(e.labels), e.truncated, doc_lengths=[len(e.input_ids)]))
    return rows


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
    choice_scoring: str = "first_token",
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
    if choices is not None and choice_scoring == "sequence":
        enc.choice_seqs = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
        enc.choice_label = gold
    elif choices is not None:
        enc.choice_ids = choice_token_ids(tokenizer, choices)
        enc.choice_label = gold
        if tail[0] != enc.choice_ids[gold]:
            raise ValueError(
                f"The answer {answer[:40]!r} does not start with the token of its option {choices[gold]!r};"
                " the task's answers must begin with the option text."
            )
    return enc
