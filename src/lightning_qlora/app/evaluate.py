"""Scoring a saved adapter on a recipe's split, with the recipe's metrics (``lightning-qlora evaluate``)."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from omegaconf import DictConfig

from lightning_qlora.app.train import _floats, _unsharded_storage, build_data, build_module, load_splits
from lightning_qlora.io.export import quant_config_of
from lightning_qlora.io.models import load_tokenizer
from lightning_qlora.lightning.callbacks import LoRAAdapters
from lightning_qlora.lightning.plugin import QLoRAPlugin
from lightning_qlora.tasks.data import get_task


def evaluate_adapter(cfg: DictConfig, adapter: str, meta: dict[str, Any], split: str = "test") -> dict[str, float]:
    """Score a saved adapter on ``split`` of the configured data, with the recipe's metrics."""
    L.seed_everything(cfg.seed, verbose=False)
    task = get_task(cfg.data.task)
    splits, source = load_splits(cfg.data, task, cfg.seed)
    if split == "test" and "test" not in splits:
        raise ValueError(f"{source} has no test split; use --split validation.")
    rank_zero_info(f"Data: {source}")
    tokenizer = load_tokenizer(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    dm = build_data(cfg, task, tokenizer, splits)
    module = build_module(cfg, task)
    q = quant_config_of(meta) if meta.get("quant") else None
    quant = cfg.quant
    plugin = QLoRAPlugin(
        q.quant_type if q else quant.type,
        q.double_quant if q else quant.double_quant,
        quant.compute_dtype,
        q.quant_storage if q else _unsharded_storage(quant.quant_storage),
        list(q.skip_modules if q else quant.skip_modules),
        int8_modules=(meta.get("quant") or {}).get("int8_modules", ()),
    )
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        plugins=[plugin],
        callbacks=[LoRAAdapters(gradient_checkpointing=False, load_from=adapter)],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    run_split = trainer.test if split == "test" else trainer.validate
    return _floats(run_split(module, dm, verbose=False)[0])
