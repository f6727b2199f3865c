"""Check a composed run config before anything loads, and report every problem at once.

Hydra already refuses unknown keys (the config is in struct mode) and unknown group
options. This adds types, ranges and combinations, so that a run with three mistakes
fails once, in a second, with all three named, instead of three times after loading a model.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

Rule = tuple[str, Callable[[Any], bool], str]


def _int(low: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _num(low: float, strict: bool = False, high: float | None = None) -> Callable[[Any], bool]:
    def ok(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        above = v > low if strict else v >= low
        return above and (high is None or v < high)

    return ok


def _one_of(*options: Any) -> Callable[[Any], bool]:
    return lambda v: v in options


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


RULES: tuple[Rule, ...] = (
    ("seed", _int(0), "an integer >= 0"),
    ("overwrite", _bool, "true or false"),
    ("model.trust_remote_code", _bool, "true or false (false unless you trust the model's code)"),
    ("model.low_memory", lambda v: isinstance(v, bool) or v == "auto", "true, false or auto"),
    ("quant.type", _one_of("nf4", "fp4", "int8"), "one of nf4, fp4, int8"),
    ("quant.double_quant", _bool, "true or false"),
    ("quant.compute_dtype", _one_of("auto", "bf16", "fp16", "fp32"), "one of auto, bf16, fp16, fp32"),
    ("quant.quant_storage", _one_of("auto", "uint8", "bf16", "fp16", "fp32"), "one of auto, uint8, bf16, fp16, fp32"),
    (
        "quant.keep_high_precision",
        lambda v: v is None or _num(0, strict=True, high=1)(v),
        "null or in (0, 1), e.g. 0.05",
    ),
    ("adapter.r", _int(1), "a positive integer, e.g. 16"),
    ("adapter.alpha", _num(0, strict=True), "a positive number, e.g. 2*r"),
    ("adapter.dropout", _num(0, high=1), "in [0, 1), e.g. 0.05"),
    ("adapter.gradient_checkpointing", _bool, "true or false"),
    ("adapter.use_dora", _bool, "true or false"),
    ("adapter.use_rslora", _bool, "true or false"),
    ("adapter.init", _one_of("default", "loftq"), "one of default, loftq"),
    ("trainer.max_steps", _int(1), "an integer >= 1"),
    ("trainer.lr", _num(0, strict=True), "a positive number, e.g. 2e-4"),
    ("trainer.weight_decay", _num(0), "a number >= 0"),
    ("trainer.warmup_steps", _int(0), "an integer >= 0"),
    ("trainer.accumulate_grad_batches", _int(1), "an integer >= 1"),
    ("trainer.log_every_n_steps", _int(1), "an integer >= 1"),
    ("trainer.checkpoint_every_n_steps", _int(1), "an integer >= 1"),
    ("trainer.max_skipped_steps", _int(0), "an integer >= 0"),
    ("trainer.optimizer", _one_of("adamw", "paged_adamw_8bit"), "one of adamw, paged_adamw_8bit"),
    ("trainer.gradient_clip_val", lambda v: v is None or _num(0)(v), "a number >= 0, or null"),
    ("trainer.devices", lambda v: v == "auto" or _int(1)(v), "an integer >= 1, or auto"),
    ("trainer.num_nodes", _int(1), "an integer >= 1"),
    (
        "trainer.strategy",
        _one_of("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "fsdp"),
        "auto, ddp or fsdp (trainer=ddp, trainer=fsdp)",
    ),
    ("data.batch_size", _int(1), "an integer >= 1"),
    ("data.max_length", _int(16), "an integer >= 16 (tokens)"),
    ("data.val_fraction", _num(0, strict=True, high=1), "in (0, 1), e.g. 0.2"),
    ("data.packing", _bool, "true or false"),
    ("logger.type", _one_of("csv", "tensorboard", "wandb"), "one of csv, tensorboard, wandb"),
)


def config_problems(cfg: DictConfig) -> list[str]:
    """Every problem with ``cfg``, one short phrase each (empty when it is fine)."""
    problems = []
    for key, ok, expected in RULES:
        value = OmegaConf.select(cfg, key, default="<missing>")
        if value == "<missing>":
            continue  # a config without that group (e.g. in a test) is not wrong
        if not ok(value):
            problems.append(f"{key}={value!r} should be {expected}")
    get = lambda key: OmegaConf.select(cfg, key)  # noqa: E731
    if get("quant.type") == "int8" and get("quant.compute_dtype") == "bf16":
        problems.append("quant.type=int8 cannot compute in bf16; use quant.compute_dtype=fp16, fp32 or auto")
    if get("quant.type") == "int8" and get("quant.quant_storage") not in (None, "auto", "uint8"):
        problems.append("quant.quant_storage applies to 4-bit types only; keep uint8 with int8")
    if get("quant.keep_high_precision") is not None and get("quant.type") == "int8":
        problems.append("quant.keep_high_precision promotes 4-bit layers to int8; use it with nf4 or fp4")
    if get("quant.keep_high_precision") is not None and get("model.low_memory") is True:
        problems.append("quant.keep_high_precision measures the unquantized weights; set model.low_memory=false")
    if get("adapter.init") == "loftq" and get("quant.type") == "int8":
        problems.append("adapter.init=loftq needs a 4-bit quant.type (nf4 or fp4)")
    if get("adapter.init") == "loftq" and get("adapter.use_dora") is True:
        problems.append("adapter.init=loftq and adapter.use_dora=true cannot be combined; choose one")
    if get("adapter.init") == "loftq" and get("model.low_memory") is True:
        problems.append("adapter.init=loftq needs the unquantized weights; set model.low_memory=false")
    if get("trainer.accelerator") == "cpu" and get("trainer.optimizer") == "paged_adamw_8bit":
        problems.append("trainer.optimizer=paged_adamw_8bit needs a GPU; use adamw on CPU")
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
