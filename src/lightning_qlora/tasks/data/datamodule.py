"""DataModules: (prompt, answer) fine-tuning with answer-only loss, and text classification."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader

from lightning_qlora.tasks.data.formatting import Encoded, encode_pair, pack
from lightning_qlora.tasks.data.sampler import ResumableLoader, ResumableSampler
from lightning_qlora.tasks.metrics import IGNORE_INDEX

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
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any(e.doc_lengths for e in batch):
        out["attention_mask"], out["position_ids"] = _packed_mask_and_positions(batch, width)
    if all(e.choice_ids is not None for e in batch):
        out["choice_ids"] = torch.tensor([e.choice_ids for e in batch], dtype=torch.long)
        out["choice_label"] = torch.tensor([e.choice_label for e in batch], dtype=torch.long)
        out["answer_start"] = torch.tensor([e.answer_start for e in batch], dtype=torch.long)
    if all(e.choice_seqs is not None for e in batch):
        out["choice_seqs"] = [e.choice_seqs for e in batch]
        out["choice_label"] = torch.tensor([e.choice_label for e in batch], dtype=torch.long)
        out["answer_start"] = torch.tensor([e.answer_start for e in batch], dtype=torch.long)
    return out


def collate_padding_free(batch: Sequence[Encoded]) -> dict[str, torch.Tensor]:
    """The batch's examples end to end in one row, without padding or an attention mask.

    Position ids restart at each example; from them transformers derives the block-diagonal
    causal mask (sdpa, eager) or runs variable-length attention (flash-attention). An example's
    first token is never scored from the one before it.
    """
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for e in batch:
        ids += e.input_ids
        labels += [IGNORE_INDEX, *e.labels[1:]]
        positions += range(len(e.input_ids))
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
    }


def _packed_mask_and_positions(batch: Sequence[Encoded], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (batch, 1, width, width) block-diagonal causal mask and per-example position ids."""
    doc = torch.full((len(batch), width), -1, dtype=torch.long)  # padding: one block of its own
    positions = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        start = 0
        for d, n in enumerate(e.doc_lengths or [len(e.input_ids)]):
            doc[i, start : start + n] = d
            positions[i, start : start + n] = torch.arange(n)
            start += n
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    mask = (doc[:, :, None] == doc[:, None, :]) & causal
    return mask[:, None], positions


class _TokenizedDataModule(L.LightningDataModule):
    """Shared plumbing: argument checks, tokenizing each split once, loaders."""

    def __init__(self, tokenizer, splits: dict[str, list[Row]], max_length: int, batch_size: int, seed: int) -> None:
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
        self.max_length = max_length
        self.batch_size = batch_size
        self.seed = seed
        self.encoded: dict[str, list[Any]] = {}

    def _encode_row(self, row: Row, split: str) -> tuple[Any | None, bool]:
        """One row → (item, or None to drop it; whether it was truncated)."""
        raise NotImplementedError

    def _collate(self, batch: list[Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _collate_train(self, batch: list[Any]) -> dict[str, torch.Tensor]:
        return self._collate(batch)

    def setup(self, stage: str | None = None) -> None:
        from tqdm.auto import tqdm

        for split, rows in self.splits.items():
            if split in self.encoded or not rows:
                continue
            out, truncated, dropped = [], 0, 0
            for row in tqdm(rows, desc=f"Tokenizing {split}", unit="row", leave=False, disable=len(rows) < 500):
                item, cut = self._encode_row(row, split)
                truncated += cut
                if item is None:
                    dropped += 1
                else:
                    out.append(item)
            if not out:
                raise ValueError(
                    f"Every {split} row was cut before its answer at max_length={self.max_length};"
                    " raise data.max_length."
                )
            note = f", {truncated} truncated to {self.max_length} tokens" if truncated else ""
            note += f", {dropped} dropped (no answer token left)" if dropped else ""
            rank_zero_info(f"Data: {split}: {len(out)} examples{note}")
            self.encoded[split] = out

    def _loader(self, split: str, sampler: ResumableSampler | None = None) -> DataLoader:
        collate_fn = self._collate_train if split == "train" else self._collate
        if sampler is not None:
            data = self.encoded[split]
            return ResumableLoader(data, batch_size=self.batch_size, sampler=sampler, collate_fn=collate_fn)
        return DataLoader(self.encoded[split], batch_size=self.batch_size, sampler=sampler, collate_fn=collate_fn)

    def train_dataloader(self) -> DataLoader:
        data = self.encoded["train"]
        trainer = self.trainer
        if trainer is None:
            return self._loader("train", ResumableSampler(data, self.batch_size, self.seed))
        # After a resume the loop counters are restored before this is called, so the
        # sampler can start in the right epoch and skip the batches already trained on.
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer.fit_loop.restarting else 0
        sampler = ResumableSampler(
            data,
            self.batch_size,
            self.seed,
            num_replicas=trainer.world_size,
            rank=trainer.global_rank,
            epoch=trainer.current_epoch,
            skip_batches=done,
        )
        return self._loader("train", sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test" if "test" in self.encoded else "validation")


class PromptAnswerDataModule(_TokenizedDataModule):
    """Tokenize rows into chat-formatted prompt + answer examples, the loss on the answer.

    Args:
        tokenizer: A transformers tokenizer (its chat template is used when it has one).
        splits: ``{"train": rows, "validation": rows, "test": rows}``; test is optional.
        to_pair: Turns a row into ``(prompt, answer)``.
        max_length: Examples are cut to this many tokens; the count of cut rows is logged.
        batch_size: Micro-batch size.
        system: Optional system prompt.
        seed: Seed of the training shuffle.
        choices: Optional: a row's answer options, scored by likelihood in validation and test.
        choice_scoring: ``"first_token"`` or ``"sequence"`` (mean log-likelihood of each option).
        label: Optional, with ``choices``: the index of a row's right option.
        packing: ``True``: pack training examples into rows of ``max_length`` tokens (less padding,
            fewer steps per epoch); each example still sees only itself (block-diagonal attention).
            ``"padding_free"``: each training batch's examples end to end in one row, no padding
            and no mask tensor (:func:`collate_padding_free`); the same examples per step.
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
        choices: Callable[[Row], list[str]] | None = None,
        label: Callable[[Row], int] | None = None,
        packing: bool | str = False,
        choice_scoring: str = "first_token",
    ) -> None:
        super().__init__(tokenizer, splits, max_length, batch_size, seed)
        if packing not in (True, False, "padding_free"):
            raise ValueError(f"packing={packing!r}: expected true, false or padding_free.")
        self.packing = packing
        self.choice_scoring = choice_scoring
        self.to_pair = to_pair
        self.system = system
        self.choices = choices if label is not None else None
        self.label = label

    def _encode_row(self, row: Row, split: str) -> tuple[Encoded | None, bool]:
        prompt, answer = self.to_pair(row)
        options = self.choices(row) if self.choices and split != "train" else None
        gold = self.label(row) if options else -1
        enc = encode_pair(
            self.tokenizer, prompt, answer, self.max_length, self.system, options, gold, self.choice_scoring
        )
        # Cut before the answer began: nothing to learn from.
        keep = any(label != IGNORE_INDEX for label in enc.labels)
        return (enc if keep else None), enc.truncated

    def _collate(self, batch: list[Encoded]) -> dict[str, torch.Tensor]:
        return collate(batch, self.tokenizer.pad_token_id)

    def _collate_train(self, batch: list[Encoded]) -> dict[str, torch.Tensor]:
        return collate_padding_free(batch) if self.packing == "padding_free" else self._collate(batch)

    def setup(self, stage: str | None = None) -> None:
        packed_before = "train" in self.encoded
        super().setup(stage)
        if self.packing is True and not packed_before:
            examples = self.encoded["train"]
            order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(self.seed)).tolist()
            self.encoded["train"] = pack([examples[i] for i in order], self.max_length)
            rank_zero_info(f"Data: train: packed {len(examples)} examples into {len(self.encoded['train'])} rows")


class TextClassificationDataModule(_TokenizedDataModule):
    """Tokenize ``text`` fields for a classification head; ``label`` gives each row's class index."""

    def __init__(
        self,
        tokenizer,
        splits: dict[str, list[Row]],
        label: Callable[[Row], int],
        text_field: str = "text",
        max_length: int = 256,
        batch_size: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__(tokenizer, splits, max_length, batch_size, seed)
        self.label = label
        self.text_field = text_field

    def _encode_row(self, row: Row, split: str) -> tuple[tuple[list[int], int], bool]:
        ids = self.tokenizer(str(row[self.text_field]), add_special_tokens=False)["input_ids"]
        return (ids[: self.max_length], self.label(row)), len(ids) > self.max_length

    def _collate(self, batch: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (ids, _) in enumerate(batch):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
        labels = torch.tensor([label for _, label in batch], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
