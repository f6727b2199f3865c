"""The best adapter by a validation metric: which metric and which way (:class:`Monitor`), and
:class:`BestAdapter`, the callback that keeps it, exports it and ends fit with it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_qlora.core.checks import Check, Checked, one_of
from lightning_qlora.lightning.callbacks import export_adapters
from lightning_qlora.lightning.checkpoint import load_trainable_state, trainable_state
from lightning_qlora.lightning.fsdp import QLoRAFSDPStrategy, clean_name, summon_trainable

MODES = ("max", "min")


def _is_val_metric(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("val_") and len(value) > len("val_")


@dataclass(frozen=True)
class Monitor(Checked):
    """A validation metric, and whether higher (``max``) or lower (``min``) is better.

    Args:
        metric: A metric the LightningModule logs in validation, e.g. ``"val_choice_acc"``.
        mode: ``"max"`` or ``"min"``.
    """

    metric: str = "val_loss"
    mode: str = "min"

    CHECKS = (
        Check("metric", _is_val_metric, "a validation metric's name, starting with val_", "val_loss"),
        one_of("mode", MODES),
    )

    def __post_init__(self) -> None:
        self.check()

    def value(self, logged: Mapping[str, Any]) -> float:
        """The metric's value among ``logged`` (a validation's metrics).

        Raises:
            ValueError: the metric is not there; the message names the ones that are.
        """
        if self.metric not in logged:
            names = ", ".join(sorted(k for k in logged if k.startswith("val_"))) or "none"
            raise ValueError(
                f"metric {self.metric!r} is not logged by this task's validation, which logs {names};"
                " monitor one of those (recipe.metric in a recipe)."
            )
        return float(logged[self.metric])

    def improves(self, value: float, best: float | None) -> bool:
        """Whether ``value`` beats ``best``: strictly (a tie keeps the earlier one); any finite value beats none."""
        if not math.isfinite(value):
            return False
        return best is None or (value > best if self.mode == "max" else value < best)


class BestAdapter(Callback):
    """Keep the adapter that scores best on a validation metric during fit, export it, end fit with it.

    At each validation during fit that beats the best so far, the trainable weights are copied
    (to CPU, on every rank) and, with ``export_dir``, exported there in PEFT format, replacing the
    previous best atomically. At the end of fit the best weights go back into the module, so that
    what is validated, tested or exported next is the adapter in ``export_dir``. A fit without any
    validation has nothing to choose from: the last adapter is exported instead.

    ``history`` holds ``(step, value)`` of every validation during fit. It, the best score, its step
    and its weights are kept in checkpoints, so a resumed fit goes on comparing with the earlier
    best. ``LoRAAdapters(export_dir=...)`` exports the last adapter at the end of training, before
    this callback puts the best back.

    Args:
        monitor: The validation metric, e.g. ``"val_choice_acc"``.
        mode: ``"max"`` or ``"min"``.
        export_dir: Where to write the best adapter (PEFT format), or None to keep it in memory only.
    """

    def __init__(self, monitor: str = "val_loss", mode: str = "min", export_dir: str | os.PathLike | None = None):
        self.monitor = Monitor(monitor, mode)
        self.export_dir = Path(export_dir) if export_dir is not None else None
        self.best_score: float | None = None
        self.best_step: int | None = None
        self.history: list[tuple[int, float]] = []
        self._best: dict[str, torch.Tensor] | None = None
        self._exported_step: int | None = None  # the step of the adapter this process wrote to export_dir

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor.metric, mode=self.monitor.mode)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return  # trainer.validate() before or after fit chooses nothing
        # Rank 0's value decides on every rank: ranks must agree on the weights they keep, and FSDP's
        # snapshot needs them all.
        value = trainer.strategy.broadcast(self.monitor.value(trainer.callback_metrics), src=0)
        self.history.append((trainer.global_step, value))
        if not self.monitor.improves(value, self.best_score):
            return
        self.best_score, self.best_step = value, trainer.global_step
        self._best = snapshot_trainable(trainer)
        rank_zero_info(f"BestAdapter: {self.monitor.metric}={value:.4f} at step {self.best_step}, the best so far")
        self._export(trainer, self.best_step)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._best is None:
            self._export(trainer, trainer.global_step)  # no validation during fit: the last is the one there is

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After on_train_end, so that the last adapter was exported and checkpointed as trained.
        if self._best is None:
            return
        restore_trainable(trainer, self._best)
        rank_zero_info(f"BestAdapter: the module holds the adapter of step {self.best_step} again")
        if self._exported_step != self.best_step:
            self._export(trainer, self.best_step)  # a resumed fit whose best came before it, written elsewhere

    def _export(self, trainer: L.Trainer, step: int | None) -> None:
        if self.export_dir is not None:
            export_adapters(trainer, self.export_dir)
            self._exported_step = step

    @override
    def state_dict(self) -> dict[str, Any]:
        history = [list(point) for point in self.history]
        return {"best_score": self.best_score, "best_step": self.best_step, "history": history, "weights": self._best}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_score = state_dict["best_score"]
        self.best_step = state_dict["best_step"]
        self.history = [(int(step), float(value)) for step, value in state_dict["history"]]
        self._best = state_dict["weights"]


def snapshot_trainable(trainer: L.Trainer) -> dict[str, torch.Tensor]:
    """The module's trainable tensors, whole, on CPU, on every rank (FSDP gathers its shards); all ranks call it."""
    module, strategy = trainer.lightning_module, trainer.strategy
    if isinstance(strategy, QLoRAFSDPStrategy):
        with summon_trainable(strategy.model, writeback=False):
            return {clean_name(n): p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}
    return trainable_state(module)


def restore_trainable(trainer: L.Trainer, state: dict[str, torch.Tensor]) -> None:
    """Copy a :func:`snapshot_trainable` back into the module (into FSDP's shards); all ranks call it."""
    module, strategy = trainer.lightning_module, trainer.strategy
    source = "the best adapter kept by BestAdapter"
    if isinstance(strategy, QLoRAFSDPStrategy):
        with summon_trainable(strategy.model, writeback=True):
            load_trainable_state(module, state, source, rename=clean_name)
        return
    load_trainable_state(module, state, source)
