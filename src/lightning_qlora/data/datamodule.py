"""A DataModule for (prompt, answer) fine-tuning, with the loss on the answer tokens."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader

from lightning_qlora.data.formatting import Encoded, encode_pair
from lightning_qlora.metrics import IGNORE_INDEX

Row = dict[str, Any]


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding gets attention 0 and label ``-100``."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class PromptAnswerDataModule(L.LightningDataModule):
    """Tokenize rows into chat-formatted prompt + answer examples.

    Args:
        tokenizer: A transformers tokenizer (its chat template is used when it has one).
        splits: ``{"train": rows, "validation": rows, "test": rows}``; test is optional.
        to_pair: Turns a row into ``(prompt, answer)``.
        max_length: Examples are cut to this many tokens; the count of cut rows is logged.
        batch_size: Micro-batch size.
        system: Optional system prompt.
        seed: Seed of the training shuffle.
    """

    def __init__(
        self,
        tokenizer,
        splits: dict[str, list[Row]],
        to_pair: Callable[[Row], tuple[str, str]],
        max_length: int = 512,
        batch_size: int = 4,
        system: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if max_length < 8:
            raise ValueError(f"max_length={max_length} is too small; use at least 64 tokens.")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} should be >= 1.")
        for split in ("train", "validation"):
            if not splits.get(split):
                raise ValueError(f"The {split!r} split is empty; give it at least one row.")
        self.tokenizer = tokenizer
        self.splits = splits
        self.to_pair = to_pair
        self.max_length = max_length
        self.batch_size = batch_size
        self.system = system
        self.seed = seed
        self.encoded: dict[str, list[Encoded]] = {}

    def setup(self, stage: str | None = None) -> None:
        for split, rows in self.splits.items():
            if split not in self.encoded and rows:
                self.encoded[split] = self._encode(split, rows)

    def _encode(self, split: str, rows: list[Row]) -> list[Encoded]:
        from tqdm.auto import tqdm

        out, truncated, dropped = [], 0, 0
        for row in tqdm(rows, desc=f"Tokenizing {split}", unit="row", leave=False, disable=len(rows) < 500):
            prompt, answer = self.to_pair(row)
            enc = encode_pair(self.tokenizer, prompt, answer, self.max_length, self.system)
            truncated += enc.truncated
            if all(label == IGNORE_INDEX for label in enc.labels):
                dropped += 1  # cut before the answer began: nothing to learn from
                continue
            out.append(enc)
        if not out:
            raise ValueError(
                f"Every {split} row was cut before its answer at max_length={self.max_length}; raise data.max_length."
            )
        note = f", {truncated} truncated to {self.max_length} tokens" if truncated else ""
        note += f", {dropped} dropped (no answer token left)" if dropped else ""
        rank_zero_info(f"Data: {split}: {len(out)} examples{note}")
        return out

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        pad_id = self.tokenizer.pad_token_id
        return DataLoader(
            self.encoded[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            collate_fn=lambda b: collate(b, pad_id),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test" if "test" in self.encoded else "validation", shuffle=False)
