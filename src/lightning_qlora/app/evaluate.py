"""Scoring a saved adapter on a recipe's split, with the recipe's metrics (``lightning-qlora evaluate``)."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from lightning_qlora.app.build import build_data, build_module, unsharded_storage
from lightning_qlora.app.report import round_metrics
from lightning_qlora.app.splits import load_splits, task_of
from lightning_qlora.io.export import quant_config_of, read_metadata
from lightning_qlora.io.models import load_tokenizer
from lightning_qlora.lightning.callbacks import LoRAAdapters
from lightning_qlora.lightning.plugin import QLoRAPlugin

CONFIG_MODULE = "lightning_qlora.conf"
# What scoring reads from the config an adapter was trained with; the rest (optimizer, steps)
# does not change a score, and comes from this version's defaults.
RECORDED_KEYS = ("seed", "model", "quant", "data", "trainer.accelerator")


def compose_config(overrides: list[str]) -> DictConfig:
    """This version's run config (the one that ships in the package) with ``overrides``."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        return compose("config", overrides=overrides)


def adapter_config(meta: dict[str, Any], recipe: str | None = None) -> DictConfig:
    """The config to score an adapter with: this version's defaults for its recipe, then the
    recorded training config's data, model and quantization where this version still has the key.

    Starting from today's config keeps adapters of earlier versions (0.1.0) evaluable after keys
    moved; ``recipe`` chooses another recipe's data and drops the recorded data.
    """
    recorded = OmegaConf.create(meta["training_config"]) if meta.get("training_config") else None
    if recorded is None and not recipe:
        raise ValueError("the adapter does not record its training config; pass --recipe NAME (e.g. medical).")
    name = recipe or OmegaConf.select(recorded, "recipe.name")
    shipped = _shipped_recipe_names()
    cfg = compose_config([f"recipe={name}"] if name in shipped else [])
    if recipe and recipe not in shipped:
        raise ValueError(f"--recipe={recipe!r} is not a shipped recipe; use one of {', '.join(sorted(shipped))}.")
    if recorded is not None:
        for key in RECORDED_KEYS:
            if recipe and key == "data":
                continue
            value = OmegaConf.select(recorded, key)
            if value is not None:
                _merge_known(cfg, key, value)
    return cfg


def _merge_known(cfg: DictConfig, key: str, value: Any) -> None:
    """Set ``key`` to the recorded ``value``, keeping only the sub-keys this version knows."""
    current = OmegaConf.select(cfg, key, default="<missing>")
    if isinstance(current, str) and current == "<missing>":
        return
    if isinstance(current, DictConfig) and OmegaConf.is_dict(value):
        for sub, item in value.items():
            _merge_known(cfg, f"{key}.{sub}", item)
        return
    OmegaConf.update(cfg, key, value, merge=False)


def _shipped_recipe_names() -> set[str]:
    from importlib.resources import files

    return {
        p.name.removesuffix(".yaml")
        for p in files(CONFIG_MODULE).joinpath("recipe").iterdir()
        if p.name.endswith(".yaml")
    }


def evaluate_adapter(cfg: DictConfig, adapter: str, meta: dict[str, Any], split: str = "test") -> dict[str, float]:
    """Score a saved adapter on ``split`` of the configured data, with the recipe's metrics."""
    L.seed_everything(cfg.seed, verbose=False)
    task = task_of(cfg.data)
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
        q.quant_storage if q else unsharded_storage(quant.quant_storage),
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
    return round_metrics(run_split(module, dm, verbose=False)[0])


def evaluate_saved_adapter(
    adapter: str, recipe: str | None = None, overrides: list[str] = (), base: str | None = None, split: str = "test"
) -> dict[str, float]:
    """``lightning-qlora evaluate``: the adapter's recorded config (or ``recipe``'s), ``overrides`` on top,
    scored on ``split``; ``base`` replaces the base model the adapter records."""
    meta = read_metadata(adapter)
    cfg = adapter_config(meta, recipe)
    OmegaConf.set_struct(cfg, True)
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except Exception as err:  # omegaconf raises its own types for unknown keys
        raise ValueError(f"bad override in {list(overrides)}: {err}") from err
    if base:
        cfg.model.name_or_path = base
    elif meta.get("base_model"):
        cfg.model.name_or_path = meta["base_model"]
    return evaluate_adapter(cfg, adapter, meta, split)
