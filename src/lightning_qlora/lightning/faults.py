"""Faults during training: preemption (SIGTERM) saves a checkpoint; a NaN/inf loss stops or skips the step.

Lightning turns SIGTERM into a ``SIGTERMException`` at the next step boundary (and SLURM's
requeue signal into an HPC checkpoint when auto-requeue is on). At a step boundary the
state is consistent, so saving ``last.ckpt`` there resumes exactly with ``resume=last``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override


class NonFiniteLossError(ValueError):
    """The training loss became NaN or inf; raised before the update, so the weights are intact."""


class FaultGuard(Callback):
    """Checkpoint on SIGTERM; stop (or skip a bounded number of steps) on a non-finite loss.

    Args:
        checkpoint_dir: Where ``last.ckpt`` goes on SIGTERM (the ``ModelCheckpoint`` folder).
        max_skipped_steps: Steps with a NaN/inf loss to skip (no update) before stopping; 0 stops at the first.
    """

    def __init__(self, checkpoint_dir: str | os.PathLike | None = None, max_skipped_steps: int = 0) -> None:
        if isinstance(max_skipped_steps, bool) or not isinstance(max_skipped_steps, int) or max_skipped_steps < 0:
            raise ValueError(f"max_skipped_steps={max_skipped_steps!r} should be an integer >= 0.")
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.max_skipped_steps = max_skipped_steps
        self.skipped: list[int] = []
        self.saved_on_sigterm: Path | None = None
        self._batch_idx = -1
        self._skip_update = False

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_idx = batch_idx

    @override
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        bad = torch.tensor(0.0 if torch.isfinite(loss.detach()).all() else 1.0, device=loss.device)
        # Every rank must take the same decision, or DDP's gradient all-reduce would hang.
        bad = trainer.strategy.reduce(bad, reduce_op="max")
        if float(bad) == 0.0:
            return
        value = float(loss.detach())
        where = f"step {trainer.global_step + 1} (epoch {trainer.current_epoch}, batch {self._batch_idx})"
        if len(self.skipped) < self.max_skipped_steps:
            self.skipped.append(trainer.global_step + 1)
            self._skip_update = True
            rank_zero_warn(
                f"loss is {value if not math.isnan(value) else 'nan'} at {where}: skipping this update"
                f" ({len(self.skipped)} of max_skipped_steps={self.max_skipped_steps})."
            )
            return
        last = f" {self.checkpoint_dir / 'last.ckpt'} is the last good checkpoint;" if self.checkpoint_dir else ""
        raise NonFiniteLossError(
            f"loss is {value} at {where}; training stopped before the update, so the weights are intact and"
            f"{last or ' nothing was saved;'} lower trainer.lr, check that batch, or allow"
            " trainer.max_skipped_steps=N skips."
        )

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._skip_update:
            return
        self._skip_update = False
        # No gradient, no update: AdamW leaves parameters (and their moments) without grads alone.
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or self.checkpoint_dir is None:
            return
        if trainer.state.fn != TrainerFn.FITTING:
            return
        path = self.checkpoint_dir / "last.ckpt"
        trainer.save_checkpoint(path)
        self.saved_on_sigterm = path
        rank_zero_info(f"SIGTERM: saved {path} at step {trainer.global_step}; continue with resume=last.")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"skipped": list(self.skipped)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = list(state_dict.get("skipped", []))
