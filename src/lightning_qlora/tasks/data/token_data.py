"""Token classification data: words tokenized into sub-words, one word tag on one sub-word each."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lightning_qlora.tasks.data.datamodule import _TokenizedDataModule
from lightning_qlora.tasks.metrics import IGNORE_INDEX

Row = dict[str, Any]
SUBWORDS = ("first", "last")
Encoded = tuple[list[int], list[int], list[int]]  # token ids, token labels, word tags


def words_tokenizer(tokenizer):
    """``tokenizer``, or a copy that puts the leading space before every pre-split word.

    Byte-level BPE (GPT-2, SmolLM2, Llama 3) tokenizes a word that has no space before it
    as the inside of another word (``lives`` -> ``l`` ``ives``): with ``is_split_into_words``
    each word needs ``add_prefix_space``, which transformers 5 accepts at load time without
    applying it to the pre-tokenizer. This sets it there, and likewise for SentencePiece-style
    ``Metaspace`` pre-tokenizers that mark only the first word.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"{type(tokenizer).__name__} is a slow tokenizer; token classification maps sub-words to words"
            " with word_ids(), which needs a fast one: load it with use_fast=True."
        )
    state = json.loads(backend.to_str())
    if not _space_every_word(state.get("pre_tokenizer")):
        return tokenizer
    from tokenizers import Tokenizer

    fixed = copy.deepcopy(tokenizer)
    fixed.backend_tokenizer.pre_tokenizer = Tokenizer.from_str(json.dumps(state)).pre_tokenizer
    if hasattr(fixed, "add_prefix_space"):
        fixed.add_prefix_space = True  # transformers 4 checks this flag before pre-split input
    return fixed


def _space_every_word(node: Any) -> bool:
    """Set the pre-tokenizer (JSON) to space every word; whether anything changed."""
    if not isinstance(node, dict):
        return False
    if node.get("type") == "Sequence":
        return any([_space_every_word(child) for child in node.get("pretokenizers", [])])
    if node.get("type") == "ByteLevel" and not node.get("add_prefix_space"):
        node["add_prefix_space"] = True
        return True
    if node.get("type") == "Metaspace" and node.get("prepend_scheme") not in (None, "always"):
        node["prepend_scheme"] = "always"
        return True
    return False


def align_labels(word_ids: Sequence[int | None], tags: Sequence[int], subword: str = "last") -> list[int]:
    """One label per token: a word's tag on its ``first`` or ``last`` sub-token, ``-100`` elsewhere.

    A causal model's first sub-token has seen none of the rest of its word; the last has seen
    all of it.
    """
    if subword not in SUBWORDS:
        raise ValueError(f"label_subword={subword!r} is unknown; use first or last.")
    labels = []
    for i, word in enumerate(word_ids):
        neighbour = word_ids[i - 1] if subword == "first" and i > 0 else None
        if subword == "last":
            neighbour = word_ids[i + 1] if i + 1 < len(word_ids) else None
        labels.append(IGNORE_INDEX if word is None or word == neighbour else tags[word])
    return labels


class TokenClassificationDataModule(_TokenizedDataModule):
    """Tokenize pre-split words for a token-classification head; ``tags`` gives each word's tag id.

    Batches hold ``input_ids``, ``attention_mask``, ``labels`` (one per token, ``-100`` but on the
    labelled sub-token of each word) and ``word_labels`` (every word's tag, ``-100``-padded), so
    that words cut by ``max_length`` still count in the entity scores.

    Args:
        tokenizer: A fast transformers tokenizer (see :func:`words_tokenizer`).
        splits: ``{"train": rows, "validation": rows, "test": rows}``; test is optional.
        tags: Row -> tag id per word.
        words_field: The rows' list of words.
        label_subword: ``"first"`` or ``"last"``: the sub-token of a word that carries its tag.
        max_length, batch_size, seed: As in ``TextClassificationDataModule``.
    """

    def __init__(
        self,
        tokenizer,
        splits: dict[str, list[Row]],
        tags: Callable[[Row], list[int]],
        words_field: str = "tokens",
        label_subword: str = "last",
        max_length: int = 128,
        batch_size: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__(words_tokenizer(tokenizer), splits, max_length, batch_size, seed)
        if label_subword not in SUBWORDS:
            raise ValueError(f"label_subword={label_subword!r} is unknown; use first or last.")
        self.tags = tags
        self.words_field = words_field
        self.label_subword = label_subword

    def _encode_row(self, row: Row, split: str) -> tuple[Encoded | None, bool]:
        tags = self.tags(row)
        enc = self.tokenizer(
            [str(w) for w in row[self.words_field]], is_split_into_words=True, add_special_tokens=False
        )
        labels = align_labels(enc.word_ids(), tags, self.label_subword)
        # Labels are placed on the whole row first, so that a cut keeps each one on its own token.
        ids, labels = enc["input_ids"][: self.max_length], labels[: self.max_length]
        keep = any(label != IGNORE_INDEX for label in labels)
        return ((ids, labels, tags) if keep else None), len(enc["input_ids"]) > self.max_length

    def _collate(self, batch: list[Encoded]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _, _ in batch)
        words = max(len(tags) for _, _, tags in batch)
        input_ids = torch.full((len(batch), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        word_labels = torch.full((len(batch), words), IGNORE_INDEX, dtype=torch.long)
        for i, (ids, token_labels, tags) in enumerate(batch):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
            labels[i, : len(ids)] = torch.tensor(token_labels)
            word_labels[i, : len(tags)] = torch.tensor(tags)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "word_labels": word_labels}
