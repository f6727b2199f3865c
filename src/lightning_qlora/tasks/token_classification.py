"""``TokenClassificationModule``: a tag per token (named entities) on a (quantized) language model."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import torch
from torch import nn
from typing_extensions import override

from lightning_qlora.io.models import DEFAULT_MODEL, check_low_memory, load_model, low_memory_args
from lightning_qlora.tasks.data.tasks import CONLL2003_TAGS
from lightning_qlora.tasks.entities import EntityMetrics
from lightning_qlora.tasks.heads import HeadModule
from lightning_qlora.tasks.metrics import IGNORE_INDEX, reset_outside_inference
from lightning_qlora.tasks.optim import check_optim_args

_TAG = re.compile(r"O|[BI]-\S+")


class TokenClassificationModule(HeadModule):
    """Fine-tune ``AutoModelForTokenClassification``: QLoRA on the body, the head trained fully.

    Batches hold ``input_ids``, ``attention_mask``, ``labels`` (a tag id per token, ``-100`` where
    unscored) and optionally ``word_labels`` (every word's tag; see ``TokenClassificationDataModule``).
    Logs ``train_loss``; ``val_loss``, and the entity-level ``val_precision``, ``val_recall``,
    ``val_f1`` and ``val_f1_<TYPE>`` of CoNLL-2003 (likewise ``test_*``).

    Args:
        model: A transformers token-classification model, or a name/path to load.
        label_names: The IOB tags in id order, ``"O"`` among them (default: CoNLL-2003's nine).
        lr, weight_decay, warmup_steps, min_lr_ratio, optimizer, low_memory: as in ``CausalLMModule``.
    """

    def __init__(
        self,
        model: nn.Module | str | os.PathLike = DEFAULT_MODEL,
        label_names: Sequence[str] = CONLL2003_TAGS,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 10,
        min_lr_ratio: float = 0.1,
        optimizer: str = "adamw",
        low_memory: bool | str = "auto",
    ) -> None:
        super().__init__()
        # Checkpoints hold only the adapters; QLoRAPlugin checks and loads them once they exist.
        self.strict_loading = False
        label_names = tuple(label_names)
        bad = [name for name in label_names if not _TAG.fullmatch(name)]
        if bad or "O" not in label_names or len(set(label_names)) != len(label_names):
            raise ValueError(
                f"label_names={list(label_names)} should be distinct IOB tags with O among them"
                f"{f' ({bad[0]!r} is not one)' if bad else ''}, e.g. O, B-PER, I-PER."
            )
        check_optim_args(optimizer, lr, weight_decay, warmup_steps, min_lr_ratio)
        check_low_memory(low_memory)
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        self.model: nn.Module | None = model.train() if isinstance(model, nn.Module) else None
        self._model_name = None if isinstance(model, nn.Module) else str(model)
        self.val_entities = EntityMetrics(label_names)
        self.test_entities = EntityMetrics(label_names)

    @override
    def configure_model(self) -> None:
        if self.model is None:
            names = self.hparams.label_names
            self.model = load_model(
                self._model_name,
                task="token-classification",
                num_labels=len(names),
                # In the model's config, so that the exported adapter and a merged model name their tags.
                id2label=dict(enumerate(names)),
                label2id={name: i for i, name in enumerate(names)},
                **low_memory_args(self),
            )
            self.model.train()  # from_pretrained returns eval mode; see CausalLMModule

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["input_ids"], batch.get("attention_mask")).float()
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
        return loss, logits

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        loss, logits = self._loss(batch)
        entities = self.val_entities if stage == "val" else self.test_entities
        entities.update(logits.argmax(-1), batch["labels"], batch.get("word_labels"))
        # Weighted by scored tokens, so that the epoch's loss is the mean over all of them.
        scored = int((batch["labels"] != IGNORE_INDEX).sum())
        self.log(f"{stage}_loss", loss, batch_size=scored, sync_dist=True)

    def _eval_end(self, stage: str) -> None:
        entities = self.val_entities if stage == "val" else self.test_entities
        scores = entities.compute()  # gathered from every rank: the same on each
        for key, value in scores.items():
            self.log(f"{stage}_{key}", value, prog_bar=stage == "val" and key == "f1")
        reset_outside_inference(entities)
