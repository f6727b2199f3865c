"""Build a run's parts from its config: logger, data, module, precision plugin, strategy, callbacks, Trainer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from lightning_qlora.app.config import optimizer_settings, task_metric
from lightning_qlora.core.adapters import AdapterConfig
from lightning_qlora.lightning.best import BestAdapter
from lightning_qlora.lightning.callbacks import LoRAAdapters
from lightning_qlora.lightning.checkpoint import AtomicCheckpointIO
from lightning_qlora.lightning.faults import FaultGuard
from lightning_qlora.lightning.fsdp import QLoRAFSDPPlugin, QLoRAFSDPStrategy
from lightning_qlora.lightning.plugin import QLoRAPlugin
from lightning_qlora.lightning.validation import StepValidation, ValidatedCheckpoint
from lightning_qlora.tasks import CausalLMModule, SequenceClassificationModule, TokenClassificationModule
from lightning_qlora.tasks.data import (
    PromptAnswerDataModule,
    Task,
    TextClassificationDataModule,
    TokenClassificationDataModule,
)


def build_logger(cfg: DictConfig, out: Path, version: str = ""):
    """CSV (default), TensorBoard, or wandb (offline when no API key is set, to sync later).

    A resumed run logs to its own ``version`` sub-folder: Lightning's CSV logger would
    otherwise delete the interrupted run's metrics file.
    """
    kind = cfg.logger.type
    if kind == "csv":
        return L.pytorch.loggers.CSVLogger(out, name="logs", version=version)
    if kind == "tensorboard":
        return L.pytorch.loggers.TensorBoardLogger(out, name="logs", version=version)
    if kind == "wandb":
        offline = not os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "offline"
        if offline:
            why = "WANDB_MODE=offline" if os.environ.get("WANDB_API_KEY") else "no WANDB_API_KEY"
            rank_zero_info(f"wandb: {why}, logging offline; sync later with `wandb sync`")
        return L.pytorch.loggers.WandbLogger(project=cfg.logger.project, save_dir=str(out), offline=offline)
    raise ValueError(f"logger={kind!r} is unknown; use csv, tensorboard or wandb.")


def build_data(cfg: DictConfig, task: Task, tokenizer, splits: dict[str, list[dict]]) -> L.LightningDataModule:
    d = cfg.data
    if task.kind == "classify":
        return TextClassificationDataModule(
            tokenizer, splits, task.label, task.text_field, d.max_length, d.batch_size, cfg.seed
        )
    if task.kind == "token":
        return TokenClassificationDataModule(
            tokenizer, splits, task.tags, task.text_field, d.label_subword, d.max_length, d.batch_size, cfg.seed
        )
    return PromptAnswerDataModule(
        tokenizer,
        splits,
        task.to_pair,
        max_length=d.max_length,
        batch_size=d.batch_size,
        system=d.system,
        seed=cfg.seed,
        choices=task.choices,
        label=task.label,
        packing=d.packing,
        choice_scoring=task.choice_scoring,
    )


def build_module(cfg: DictConfig, task: Task) -> L.LightningModule:
    """The task's LightningModule; ``optimizer=auto`` is resolved when it builds its optimizer."""
    o = optimizer_settings(cfg)  # the optimizer group, trainer.lr & co. applied
    optim = dict(lr=o["lr"], weight_decay=o["weight_decay"], warmup_steps=o["warmup_steps"], optimizer=o["name"])
    optim["low_memory"] = cfg.model.get("low_memory", "auto")
    if task.kind == "classify":
        names = task.label_names
        return SequenceClassificationModule(cfg.model.name_or_path, num_labels=len(names), label_names=names, **optim)
    if task.kind == "token":
        return TokenClassificationModule(cfg.model.name_or_path, label_names=task.label_names, **optim)
    return CausalLMModule(cfg.model.name_or_path, **optim)


def build_plugin(cfg: DictConfig) -> QLoRAPlugin:
    """The precision plugin for ``cfg``, holding the adapter spec too (for checks before loading)."""
    q, a = cfg.quant, cfg.adapter
    targets = a.target_modules if isinstance(a.target_modules, str) else list(a.target_modules)
    adapters = AdapterConfig(
        a.r,
        a.alpha,
        a.dropout,
        targets,
        tuple(a.modules_to_save),
        a.gradient_checkpointing,
        a.use_dora,
        a.use_rslora,
        a.init,
        a.get("offload_activations", False),
    )
    kwargs = dict(
        quant_type=q.type,
        double_quant=q.double_quant,
        compute_dtype=q.compute_dtype,
        skip_modules=list(q.skip_modules),
        adapters=adapters,
        keep_high_precision=q.get("keep_high_precision"),
    )
    if is_fsdp(cfg):
        return QLoRAFSDPPlugin(quant_storage=q.get("quant_storage", "auto"), **kwargs)
    return QLoRAPlugin(quant_storage=unsharded_storage(q.get("quant_storage", "auto")), **kwargs)


def unsharded_storage(storage: str) -> str:
    """``quant.quant_storage=auto`` without FSDP: packed bytes as uint8, bitsandbytes' own default."""
    return "uint8" if storage == "auto" else storage


def is_fsdp(cfg: DictConfig) -> bool:
    return cfg.trainer.get("strategy") == "fsdp"


def build_strategy(cfg: DictConfig) -> Any:
    """Lightning's strategy name as given; ``fsdp`` becomes QLoRAFSDPStrategy (the 4-bit base needs it)."""
    return QLoRAFSDPStrategy() if is_fsdp(cfg) else cfg.trainer.strategy


_NEVER = 10**9  # epochs; Lightning takes no "off" value for check_val_every_n_epoch


def build_callbacks(cfg: DictConfig, out: Path, plugin: QLoRAPlugin) -> list[L.Callback]:
    """Adapters, checkpoints, fault handling and, with ``trainer.val_check_interval``, validation every N
    optimizer steps, the best adapter by the task metric (``adapter/``; the last goes to ``adapter-last/``)
    and early stopping.
    """
    t = cfg.trainer
    interval = t.val_check_interval
    last = LoRAAdapters.from_config(plugin.adapter_config, export_dir=out / ("adapter-last" if interval else "adapter"))
    # Adapter-only checkpoints (QLoRAPlugin drops the frozen base), written atomically, and after
    # a validation due at their step, so that they hold what it changed (best adapter, patience).
    checkpoints = ValidatedCheckpoint(
        dirpath=out / "checkpoints",
        filename="step={step}",
        every_n_train_steps=t.checkpoint_every_n_steps,
        save_top_k=0,
        save_last=True,
        save_on_train_epoch_end=False,
    )
    callbacks = [last, checkpoints, FaultGuard(out / "checkpoints", t.max_skipped_steps)]
    if not interval:
        return callbacks
    monitor = task_metric(cfg)
    callbacks += [StepValidation(interval), BestAdapter(monitor.metric, monitor.mode, export_dir=out / "adapter")]
    patience = OmegaConf.select(t, "early_stopping.patience")
    if patience:
        min_delta = OmegaConf.select(t, "early_stopping.min_delta", default=0.0)
        stop = EarlyStopping(monitor.metric, min_delta, patience, mode=monitor.mode, check_on_train_epoch_end=False)
        callbacks.append(stop)
    return callbacks


def build_trainer(cfg: DictConfig, out: Path, log_version: str = "") -> L.Trainer:
    t = cfg.trainer
    plugin = build_plugin(cfg)
    try:
        return L.Trainer(
            accelerator=t.accelerator,
            devices=t.devices,
            num_nodes=t.num_nodes,
            strategy=build_strategy(cfg),
            max_steps=t.max_steps,
            # In training batches; StepValidation moves each validation to the optimizer step it is due at.
            val_check_interval=t.val_check_interval * t.accumulate_grad_batches if t.val_check_interval else None,
            # No interval: no validation inside fit (run() validates before and after it), so an
            # epoch boundary does not cost a validation pass that the "after" one repeats.
            check_val_every_n_epoch=None if t.val_check_interval else _NEVER,
            accumulate_grad_batches=t.accumulate_grad_batches,
            gradient_clip_val=t.gradient_clip_val,
            # A run shorter than the logging interval would otherwise log no training loss at all.
            log_every_n_steps=max(1, min(t.log_every_n_steps, t.max_steps)),
            plugins=[plugin, AtomicCheckpointIO()],
            callbacks=build_callbacks(cfg, out, plugin),
            logger=build_logger(cfg, out, log_version),
            # Lightning's summary counts packed 4-bit bytes as parameters; the plugin logs true counts.
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=out,
        )
    except MisconfigurationException as err:  # e.g. more GPUs than this machine has
        raise ValueError(f"trainer: {err} Fix trainer.accelerator / trainer.devices (or use trainer=cpu).") from err
