"""Validation during fit every N optimizer steps, and step checkpoints that wait for it."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override


class StepValidation(Callback):
    """Validate during fit after every ``every_n_steps`` optimizer steps, across epochs.

    Lightning's integer ``val_check_interval`` counts training batches. With gradient accumulation
    those are not optimizer steps, and the two drift apart at each epoch whose batch count is not a
    multiple of ``accumulate_grad_batches`` (Lightning steps on the epoch's last, shorter
    accumulation; Lightning issue #17207). After each batch this callback decides whether that
    batch ended optimizer step ``k * every_n_steps``, and sets the batch count that Lightning's
    check compares with accordingly.

    The Trainer must validate by batch count across epochs: ``Trainer(val_check_interval=N,
    check_val_every_n_epoch=None)``, N any integer (``every_n_steps * accumulate_grad_batches`` is
    this schedule wherever the two do not drift). A fit shorter than ``every_n_steps`` validates
    never.

    Args:
        every_n_steps: Optimizer steps between validations.
    """

    def __init__(self, every_n_steps: int) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps!r} should be an integer >= 1 (optimizer steps).")
        self.every_n_steps = every_n_steps
        self._last_step = 0

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and (
            trainer.check_val_every_n_epoch is not None or not isinstance(trainer.val_check_interval, int)
        ):
            raise ValueError(
                "StepValidation needs validation by batch count across epochs; pass"
                " Trainer(val_check_interval=<an integer>, check_val_every_n_epoch=None)."
            )

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step  # a resumed fit starts at its checkpoint's step

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stepped = trainer.global_step != self._last_step  # an accumulating batch does not step
        self._last_step = trainer.global_step
        due = stepped and trainer.global_step % self.every_n_steps == 0
        # With check_val_every_n_epoch=None, Lightning validates after this batch when the batches
        # so far are a multiple of val_check_batch, which it reads only then.
        batches = trainer.fit_loop.epoch_loop.total_batch_idx + 1
        trainer.val_check_batch = batches if due else batches + 1


def validates_after_batch(trainer: L.Trainer) -> bool:
    """Whether Lightning validates right after the current training batch (validation by batch count
    across epochs, ``check_val_every_n_epoch=None``; False in any other mode).
    """
    every = trainer.val_check_batch
    if trainer.check_val_every_n_epoch is not None or not isinstance(every, int) or not trainer.enable_validation:
        return False
    return (trainer.fit_loop.epoch_loop.total_batch_idx + 1) % every == 0


class ValidatedCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last`` checkpoint is also saved after each validation during fit.

    ``every_n_train_steps`` saves in ``on_train_batch_end``, before a validation of the same step:
    that checkpoint would lack what the validation changed (the best adapter, early stopping's
    count), and a fit resumed from it skips that validation (Lightning takes it as done). Such a
    save is moved after the validation, and every validation during fit saves ``last``.
    """

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not validates_after_batch(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        during_fit = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        if during_fit and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
