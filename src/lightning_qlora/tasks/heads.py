"""What the head modules (sequence and token classification) share: the forward, the training step,
the validation/test hooks and the optimizer. Each subclass computes its loss (``_loss``) and its
metrics (``_eval_step`` and ``_eval_end``, per stage ``"val"`` or ``"test"``).
"""

from __future__ import annotations

import lightning as L
import torch
from typing_extensions import override

from lightning_qlora.tasks.optim import configure_optimizers


class HeadModule(L.LightningModule):
    """A transformers model with a task head (``self.model``), trained with QLoRA on its body."""

    @override
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        raise NotImplementedError

    def _eval_end(self, stage: str) -> None:
        raise NotImplementedError

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["labels"].size(0))
        return loss

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    @override
    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    @override
    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    @override
    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    @override
    def configure_optimizers(self):
        return configure_optimizers(self)
