"""Check a composed run config before anything loads, and report every problem at once.

Hydra already refuses unknown keys (the config is in struct mode) and unknown group
options. This adds types, ranges and combinations, so that a run with three mistakes
fails once, in a second, with all three named, instead of three times after loading a model.

Each rule lives once, with its config dataclass: ``QuantConfig``, ``AdapterConfig``,
``OptimizerConfig``, and :class:`TrainerConfig` and :class:`DataConfig` here. This module only
maps each group's keys to those fields, and adds the few rules that span groups.

The groups are not registered as typed Hydra structured configs on purpose: OmegaConf would
then refuse ``adapter.r=sixteen`` while composing, alone and in its own words, before this check
could name it along with every other problem.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from lightning_qlora.core import checks
from lightning_qlora.core.adapters import AdapterConfig
from lightning_qlora.core.checks import Check, Checked, Combo, is_bool, is_int, is_number, one_of
from lightning_qlora.core.quantize import QuantConfig
from lightning_qlora.lightning.best import Monitor
from lightning_qlora.tasks.optim import OptimizerConfig

_MISSING = "<missing>"
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "fsdp")
# trainer.<alias> -> optimizer.<key>: the optimizer's older names, kept for the command line.
ALIASES = {"optimizer": "name", "lr": "lr", "weight_decay": "weight_decay", "warmup_steps": "warmup_steps"}


@dataclass(frozen=True)
class TrainerConfig(Checked):
    """The ``trainer`` group (conf/trainer/*.yaml documents each key), but for its optimizer aliases."""

    accelerator: str
    devices: int | str
    num_nodes: int
    strategy: str
    max_steps: int
    val_check_interval: int | None
    accumulate_grad_batches: int
    gradient_clip_val: float | None
    log_every_n_steps: int
    max_skipped_steps: int
    checkpoint_every_n_steps: int
    # trainer.early_stopping.patience and .min_delta; defaults: a config saved by an older release still composes.
    early_stopping_patience: int | None = None
    early_stopping_min_delta: float = 0.0

    CHECKS = (
        Check("max_steps", is_int(1), "an integer >= 1"),
        Check("val_check_interval", lambda v: v is None or is_int(1)(v), "null or an integer >= 1 (optimizer steps)"),
        Check("early_stopping_patience", lambda v: v is None or is_int(1)(v), "null (off) or an integer >= 1", "3"),
        Check("early_stopping_min_delta", is_number(0), "a number >= 0", "0.0"),
        Combo(
            ("early_stopping_patience", "val_check_interval"),
            lambda patience, interval: patience is None or interval is not None,
            "{early_stopping_patience} counts validations during fit; set {val_check_interval} too (optimizer steps)",
            "{early_stopping_patience} counts validations during fit; set {val_check_interval} too.",
        ),
        Check("accumulate_grad_batches", is_int(1), "an integer >= 1"),
        Check("log_every_n_steps", is_int(1), "an integer >= 1"),
        Check("checkpoint_every_n_steps", is_int(1), "an integer >= 1"),
        Check("max_skipped_steps", is_int(0), "an integer >= 0"),
        Check("gradient_clip_val", lambda v: v is None or is_number(0)(v), "a number >= 0, or null"),
        Check("devices", lambda v: v == "auto" or is_int(1)(v), "an integer >= 1, or auto"),
        Check("num_nodes", is_int(1), "an integer >= 1"),
        Check("strategy", lambda v: v in STRATEGIES, "auto, ddp or fsdp (trainer=ddp, trainer=fsdp)"),
    )

    def __post_init__(self) -> None:
        self.check()


def _is_name(value: Any) -> bool:
    return value is None or isinstance(value, str) and bool(value.strip())


def _are_names(value: Any) -> bool:
    if value is None:
        return True
    names = list(value) if isinstance(value, (list, tuple, ListConfig)) else None
    return names is not None and len(names) >= 2 and all(_is_name(n) for n in names) and len(set(names)) == len(names)


@dataclass(frozen=True)
class DataConfig(Checked):
    """The ``data`` group (conf/data/default.yaml documents each key)."""

    task: str
    dataset: str | None
    path: str | None
    hub_config: str | None
    sample_dir: str | None
    max_length: int
    batch_size: int
    val_fraction: float
    system: str | None
    packing: bool | str
    # Newer keys have defaults: a config saved by an older release still composes.
    test_fraction: float = 0.0
    text_field: str | None = None
    label_field: str | None = None
    label_names: tuple[str, ...] | None = None
    label_subword: str = "last"

    CHECKS = (
        Check("batch_size", is_int(1), "an integer >= 1"),
        Check("max_length", is_int(16), "an integer >= 16 (tokens)"),
        Check("val_fraction", is_number(0, strict=True, high=1), "in (0, 1)", "0.2"),
        Check("test_fraction", is_number(0, high=1), "in [0, 1)", "0.1"),
        Check("packing", lambda v: is_bool(v) or v == "padding_free", "true, false or padding_free"),
        Check("text_field", _is_name, "null or a column name"),
        Check("label_field", _is_name, "null or a column name"),
        Check("label_names", _are_names, "null or a list of at least 2 distinct class names", "[negative, positive]"),
        one_of("label_subword", ("first", "last")),
        Combo(
            ("val_fraction", "test_fraction"),
            lambda val, test: val + test < 1,
            "{val_fraction} + {test_fraction} should leave rows to train on (sum below 1)",
            "{val_fraction} + {test_fraction} should be below 1.",
        ),
    )

    def __post_init__(self) -> None:
        self.check()


# Keys outside those dataclasses, by their full config key.
RUN_CHECKS = (
    Check("seed", is_int(0), "an integer >= 0"),
    Check("overwrite", is_bool, "true or false"),
    Check("measure_quant_cost", is_bool, "true or false"),
    Check("model.trust_remote_code", is_bool, "true or false (false unless you trust the model's code)"),
    Check("model.low_memory", lambda v: isinstance(v, bool) or v == "auto", "true, false or auto"),
    Check("quant.keep_high_precision", lambda v: v is None or is_number(0, True, 1)(v), "null or in (0, 1)", "0.05"),
    one_of("logger.type", ("csv", "tensorboard", "wandb")),
)
# Config key -> dataclass field, where they differ.
_FIELDS = {
    "quant": {"type": "quant_type"},
    "optimizer": {"name": "optimizer"},
    "trainer": {
        "early_stopping.patience": "early_stopping_patience",
        "early_stopping.min_delta": "early_stopping_min_delta",
    },
}


def optimizer_keys(cfg: DictConfig) -> dict[str, str]:
    """Where each optimizer setting is read: ``optimizer.<key>``, or its alias ``trainer.<alias>``
    when that holds a value of its own (the trainer group only points it at the optimizer group).
    """
    trainer = cfg.get("trainer")
    keys = {}
    for alias, key in ALIASES.items():
        given = isinstance(trainer, DictConfig) and alias in trainer and not OmegaConf.is_interpolation(trainer, alias)
        keys[key] = f"trainer.{alias}" if given else f"optimizer.{key}"
    return keys


def optimizer_settings(cfg: DictConfig) -> dict[str, Any]:
    """The effective ``name``, ``lr``, ``weight_decay`` and ``warmup_steps``, aliases applied."""
    return {key: OmegaConf.select(cfg, source) for key, source in optimizer_keys(cfg).items()}


def _keys(cfg: DictConfig, group: str, schema: type[Checked]) -> dict[str, str]:
    """Field -> the config key it is read from: renames, and for the optimizer, its aliases."""
    if group == "optimizer":
        return {_FIELDS[group].get(k, k): key for k, key in optimizer_keys(cfg).items()}
    renamed = {field: key for key, field in _FIELDS.get(group, {}).items()}
    return {f.name: f"{group}.{renamed.get(f.name, f.name)}" for f in fields(schema)}  # type: ignore[arg-type]


def _values(cfg: DictConfig, keys: Mapping[str, str]) -> dict[str, Any]:
    """Field -> value, for the keys ``cfg`` has (a config without a group, e.g. in a test, is not wrong)."""
    return {f: v for f, key in keys.items() if (v := OmegaConf.select(cfg, key, default=_MISSING)) != _MISSING}


def config_problems(cfg: DictConfig) -> list[str]:
    """Every problem with ``cfg``, one short phrase each (empty when it is fine)."""
    run_keys = {rule.field: rule.field for rule in RUN_CHECKS}
    problems = checks.config_problems(RUN_CHECKS, _values(cfg, run_keys), str)
    for group, schema in (
        ("quant", QuantConfig),
        ("adapter", AdapterConfig),
        ("trainer", TrainerConfig),
        ("optimizer", OptimizerConfig),
        ("data", DataConfig),
        ("recipe", Monitor),  # recipe.metric and recipe.mode
    ):
        keys = _keys(cfg, group, schema)
        values = _values(cfg, keys)
        if values.get("quant_storage") == "auto":
            values["quant_storage"] = "uint8"  # what auto means without FSDP; under FSDP, always a float
        problems += schema.problems(values, key=keys.__getitem__)
    return problems + _across_groups(cfg)


def task_metric(cfg: DictConfig) -> Monitor:
    """The recipe's task metric and its mode (``recipe.metric``, ``recipe.mode``); val_loss, min if it names none."""
    return Monitor(
        OmegaConf.select(cfg, "recipe.metric", default="val_loss"), OmegaConf.select(cfg, "recipe.mode", default="min")
    )


def _across_groups(cfg: DictConfig) -> list[str]:
    """The rules that span groups, each written here only."""
    get = lambda key: OmegaConf.select(cfg, key)  # noqa: E731
    problems = []
    given = [k for k in ("recipe.metric", "recipe.mode") if OmegaConf.select(cfg, k, default=_MISSING) != _MISSING]
    if len(given) == 1:  # which way a metric improves is not guessed from its name
        problems.append(f"{given[0]} is set alone; a recipe sets recipe.metric and recipe.mode (max or min) together")
    if get("quant.keep_high_precision") is not None and get("quant.type") == "int8":
        problems.append("quant.keep_high_precision promotes 4-bit layers to int8; use it with nf4 or fp4")
    if get("quant.keep_high_precision") is not None and get("model.low_memory") is True:
        problems.append("quant.keep_high_precision measures the unquantized weights; set model.low_memory=false")
    if get("adapter.init") == "loftq" and get("quant.type") == "int8":
        problems.append("adapter.init=loftq needs a 4-bit quant.type (nf4 or fp4)")
    if get("adapter.init") == "loftq" and get("model.low_memory") is True:
        problems.append("adapter.init=loftq needs the unquantized weights; set model.low_memory=false")
    if get("measure_quant_cost") is True and get("model.low_memory") is True:
        problems.append("measure_quant_cost=true validates the unquantized base; set model.low_memory=auto or false")
    one_process = get("trainer.devices") == 1 and get("trainer.num_nodes") == 1
    if get("measure_quant_cost") is True and not one_process:
        problems.append("measure_quant_cost=true runs in one process; set trainer.devices=1 (trainer=cpu or gpu)")
    name_key = optimizer_keys(cfg)["name"]
    # An explicit choice; optimizer=auto picks AdamW on CPU (tasks.optim.resolve_optimizer).
    if get("trainer.accelerator") == "cpu" and get(name_key) == "paged_adamw_8bit":
        problems.append(f"{name_key}=paged_adamw_8bit needs a GPU; use adamw on CPU")
    devices, cores = get("trainer.devices"), os.cpu_count() or 1
    if get("trainer.accelerator") == "cpu" and isinstance(devices, int) and devices > cores:
        problems.append(f"trainer.devices={devices} CPU processes is more than this machine's {cores} cores")
    strategy = get("trainer.strategy")
    if isinstance(strategy, str) and strategy.startswith("fsdp") and get("quant.quant_storage") == "uint8":
        problems.append("FSDP can only shard float storage: set quant.quant_storage=auto (or bf16) with trainer=fsdp")
    return problems


def validate_config(cfg: DictConfig) -> None:
    """Raise one ``ValueError`` listing every problem in ``cfg``."""
    problems = config_problems(cfg)
    if problems:
        noun = "problem" if len(problems) == 1 else f"{len(problems)} problems"
        raise ValueError(f"config has {noun}: " + "; ".join(problems) + ".")
