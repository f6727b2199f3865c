"""One source of config truth: the config dataclasses' rules are the ones the run config check applies."""

from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lightning_qlora.app.config import (
    ALIASES,
    DataConfig,
    TrainerConfig,
    config_problems,
    optimizer_keys,
    optimizer_settings,
    task_metric,
)
from lightning_qlora.cli.main import CONF_DIR
from lightning_qlora.core.adapters import AdapterConfig
from lightning_qlora.core.checks import Check, is_int
from lightning_qlora.core.quantize import QuantConfig
from lightning_qlora.lightning.best import Monitor
from lightning_qlora.tasks.optim import OptimizerConfig, configure_optimizers, resolve_optimizer

RECIPES = ("medical", "legal", "classification")
TRAINERS = ("cpu", "gpu", "ddp", "fsdp")


def _cfg(*overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("trainer", TRAINERS)
def test_each_group_is_exactly_its_dataclass(recipe, trainer):
    """Every key of every group is a field of its dataclass (and back): the schema cannot drift."""
    cfg = OmegaConf.to_container(_cfg(f"recipe={recipe}", f"trainer={trainer}"), resolve=True)
    q = cfg["quant"]
    QuantConfig(q["type"], q["double_quant"], q["compute_dtype"], "uint8", tuple(q["skip_modules"]))
    assert set(q) == {"type", "double_quant", "compute_dtype", "quant_storage", "skip_modules", "keep_high_precision"}
    AdapterConfig(**cfg["adapter"])
    DataConfig(**cfg["data"])
    t = {k: v for k, v in cfg["trainer"].items() if k not in ALIASES}
    t.update({f"early_stopping_{k}": v for k, v in t.pop("early_stopping").items()})  # flattened in the dataclass
    TrainerConfig(**t)
    o = cfg["optimizer"]
    OptimizerConfig(optimizer=o.pop("name"), **o)
    r = cfg["recipe"]
    assert Monitor(r["metric"], r["mode"]) and set(r) == {"name", "metric", "mode"}


def test_a_rule_changed_in_its_dataclass_changes_both_readers(monkeypatch):
    stricter = (Check("r", is_int(8), "an integer >= 8", "16"),)
    monkeypatch.setattr(AdapterConfig, "CHECKS", stricter)
    assert config_problems(_cfg("adapter.r=4")) == ["adapter.r=4 should be an integer >= 8, e.g. 16"]
    with pytest.raises(ValueError, match="r should be an integer >= 8, but got r=4; try r=16."):
        AdapterConfig(r=4)


@pytest.mark.parametrize(
    ("overrides", "problem", "schema", "build", "error"),
    [
        (("adapter.r=0",), "adapter.r=0 should be a positive integer, e.g. 16", AdapterConfig, dict(r=0), "got r=0"),
        (
            ("quant=int8", "quant.compute_dtype=bf16"),
            "quant.type=int8 cannot compute in bf16; use quant.compute_dtype=fp16, fp32 or auto",
            QuantConfig,
            dict(quant_type="int8", compute_dtype="bf16"),
            "quant_type='int8' does not support compute_dtype=bf16",
        ),
        (
            ("quant=int8", "quant.quant_storage=bf16"),
            "quant.quant_storage applies to 4-bit types only; keep uint8 with int8",
            QuantConfig,
            dict(quant_type="int8", quant_storage="bf16"),
            r"^quant_storage only applies to 4-bit types; use quant_storage='uint8' with int8\.$",
        ),
        (
            ("adapter.init=loftq", "adapter.use_dora=true"),
            "adapter.init=loftq and adapter.use_dora=true cannot be combined; choose one",
            AdapterConfig,
            dict(init="loftq", use_dora=True),
            r"^init='loftq' with use_dora=True is not supported; choose one of them\.$",
        ),
        (
            ("optimizer.warmup_steps=-2",),
            "optimizer.warmup_steps=-2 should be an integer >= 0",
            OptimizerConfig,
            dict(warmup_steps=-2),
            "warmup_steps should be >= 0",
        ),
    ],
)
def test_one_rule_two_messages(overrides, problem, schema, build, error):
    assert config_problems(_cfg(*overrides)) == [problem]
    with pytest.raises(ValueError, match=error):
        schema(**build)


def test_the_optimizer_is_named_by_the_key_that_was_given():
    assert config_problems(_cfg("optimizer.lr=-1")) == ["optimizer.lr=-1 should be a positive number, e.g. 2e-4"]
    assert config_problems(_cfg("trainer.lr=-1")) == ["trainer.lr=-1 should be a positive number, e.g. 2e-4"]
    # An alias given a value wins over the group (the recipe sets optimizer.lr).
    cfg = _cfg("trainer.lr=1e-5", "optimizer.lr=1e-3")
    assert optimizer_keys(cfg)["lr"] == "trainer.lr" and optimizer_settings(cfg)["lr"] == 1e-5
    assert config_problems(_cfg("optimizer=paged_adamw_8bit")) == [
        "optimizer.name=paged_adamw_8bit needs a GPU; use adamw on CPU"
    ]
    assert config_problems(_cfg("optimizer.name=sgd")) == [
        "optimizer.name='sgd' should be one of auto, adamw, paged_adamw_8bit"
    ]


def test_new_group_rules_are_checked_too():
    problems = config_problems(_cfg("adapter.target_modules=[]", "adapter.use_dora=1", "quant.double_quant=yes"))
    assert problems == [
        "quant.double_quant='yes' should be true or false",
        "adapter.target_modules=[] should be 'all-linear', a list of layer names or a regex",
        "adapter.use_dora=1 should be true or false",
    ]


@pytest.mark.parametrize("trainer", ["ddp", "fsdp"])
def test_several_cpu_processes_need_no_optimizer_override(trainer):
    assert config_problems(_cfg(f"trainer={trainer}", "trainer.accelerator=cpu", "trainer.devices=2")) == []


def test_auto_resolves_on_the_device():
    assert resolve_optimizer("auto", "cuda:0") == "paged_adamw_8bit"
    assert resolve_optimizer("auto", "cuda:0", sharded=True) == "adamw"  # FSDP
    assert resolve_optimizer("auto", torch.device("cpu")) == "adamw"
    assert resolve_optimizer("adamw", "cuda") == "adamw"
    assert resolve_optimizer("paged_adamw_8bit", "cpu") == "paged_adamw_8bit"  # refused when built


def _module(optimizer: str):
    params = [torch.nn.Parameter(torch.zeros(2))]
    hparams = SimpleNamespace(optimizer=optimizer, lr=1e-3, weight_decay=0.0, warmup_steps=0, min_lr_ratio=0.1)
    trainer = SimpleNamespace(strategy=object(), estimated_stepping_batches=4)
    return SimpleNamespace(hparams=hparams, parameters=lambda: params, device=torch.device("cpu"), trainer=trainer)


def test_auto_builds_adamw_on_cpu_and_explicit_paged_is_refused():
    assert type(configure_optimizers(_module("auto"))["optimizer"]) is torch.optim.AdamW
    with pytest.raises(ValueError, match="needs a CUDA device, but the model is on cpu"):
        configure_optimizers(_module("paged_adamw_8bit"))


def test_build_module_reads_the_optimizer_group_and_its_aliases():
    from lightning_qlora.app.build import build_module
    from lightning_qlora.tasks.data import get_task

    task = get_task("pubmedqa_decision")
    module = build_module(_cfg("recipe=medical"), task)
    assert (module.hparams.optimizer, module.hparams.lr, module.hparams.warmup_steps) == ("auto", 3e-4, 10)
    module = build_module(_cfg("recipe=medical", "trainer.lr=1e-4", "trainer.optimizer=adamw"), task)
    assert (module.hparams.optimizer, module.hparams.lr) == ("adamw", 1e-4)


def test_task_metric_and_validation_during_fit_rules():
    wrong = ("recipe.metric=acc", "recipe.mode=up", "trainer.val_check_interval=0.5")
    problems = config_problems(_cfg(*wrong, "trainer.early_stopping.min_delta=-1"))
    assert problems == [
        "trainer.val_check_interval=0.5 should be null or an integer >= 1 (optimizer steps)",
        "trainer.early_stopping.min_delta=-1 should be a number >= 0, e.g. 0.0",
        "recipe.metric='acc' should be a validation metric's name, starting with val_, e.g. val_loss",
        "recipe.mode='up' should be one of max, min",
    ]
    assert config_problems(_cfg("trainer.early_stopping.patience=3")) == [
        "trainer.early_stopping.patience counts validations during fit; set trainer.val_check_interval too"
        " (optimizer steps)"
    ]
    assert config_problems(_cfg("trainer.early_stopping.patience=3", "trainer.val_check_interval=10")) == []
    assert config_problems(_cfg("trainer.early_stopping.patience=0", "trainer.val_check_interval=10")) == [
        "trainer.early_stopping.patience=0 should be null (off) or an integer >= 1, e.g. 3"
    ]
    assert task_metric(_cfg("recipe=classification")) == Monitor("val_macro_f1", "max")


def test_a_recipe_names_its_metric_with_its_mode_or_neither():
    from omegaconf import open_dict

    cfg = _cfg("recipe=medical")
    with open_dict(cfg):
        del cfg.recipe["mode"]
    assert config_problems(cfg) == [
        "recipe.metric is set alone; a recipe sets recipe.metric and recipe.mode (max or min) together"
    ]
    with open_dict(cfg):
        del cfg.recipe["metric"]
    assert config_problems(cfg) == [] and task_metric(cfg) == Monitor("val_loss", "min")  # a recipe of 0.1.0
