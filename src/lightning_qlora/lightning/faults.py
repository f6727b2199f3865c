"""Faults during training: preemption (SIGTERM) saves a checkpoint; a NaN/inf loss stops or skips the step.

Lightning turns SIGTERM into a ``SIGTERMException`` at the next step boundary (and SLURM's
requeue signal into an HPC checkpoint when auto-requeue is on). At a step boundary the
state is consistent, so saving ``last.ckpt`` there resumes exactly with ``resume=last``.

A skipped step changes nothing: no parameter or optimizer moment moves, and the LR schedule and
the RNG streams are put back as they were before it, so that a run with a skipped batch goes on
as one without that batch would.
"""

from __future__ import annotations

import copy
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

from lightning_qlora.lightning.rng import rng_states, set_rng_states


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
        self._skipped_now = False
        # The state a skipped step must leave as it found: the schedulers' and the RNG streams'.
        self._before: dict[str, Any] | None = None

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_idx = batch_idx
        # Taken at the first batch of each optimizer step (of its accumulation window), while skips remain.
        if len(self.skipped) < self.max_skipped_steps and batch_idx % trainer.accumulate_grad_batches == 0:
            self._before = {
                "rng": rng_states(),
                "schedulers": [copy.deepcopy(c.scheduler.state_dict()) for c in trainer.lr_scheduler_configs],
                "lrs": [[group["lr"] for group in opt.param_groups] for opt in trainer.optimizers],
            }

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
        self._skipped_now = True
        # No gradient, no update: AdamW leaves parameters (and their moments and step counts) without
        # grads alone; a zero gradient would still decay the moments and the weights.
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Lightning stepped the LR schedulers after the (empty) optimizer step, before this hook, and
        # the skipped forward drew dropout masks: both go back to where the step found them.
        if not self._skipped_now:
            return
        self._skipped_now = False
        before = self._before
        if before is None:
            return
        for config, state in zip(trainer.lr_scheduler_configs, before["schedulers"], strict=True):
            config.scheduler.load_state_dict(state)
        for opt, lrs in zip(trainer.optimizers, before["lrs"], strict=True):
            for group, lr in zip(opt.param_groups, lrs, strict=True):
                group["lr"] = lr
        set_rng_states(before["rng"])

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
