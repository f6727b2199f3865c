"""Config validation before anything loads: every problem in one message."""

import re

import pytest
from hydra import compose, initialize_config_dir

from lightning_qlora.app.config import config_problems, validate_config
from lightning_qlora.cli.main import CONF_DIR


def _cfg(*overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("recipe", ["medical", "legal", "classification"])
def test_shipped_configs_are_valid(recipe):
    assert config_problems(_cfg(f"recipe={recipe}")) == []
    assert config_problems(_cfg(f"recipe={recipe}", "trainer=gpu", "quant=int8")) == []


def test_every_problem_is_listed_once():
    cfg = _cfg("adapter.r=0", "adapter.dropout=1.5", "trainer.lr=-1", "trainer.max_steps=0", "quant.type=nf3")
    with pytest.raises(ValueError) as err:
        validate_config(cfg)
    message = str(err.value)
    assert message.startswith("config has 5 problems: ") and "\n" not in message
    for part in (
        "adapter.r=0 should be a positive integer",
        "adapter.dropout=1.5 should be in [0, 1)",
        "trainer.lr=-1 should be a positive number",
        "trainer.max_steps=0 should be an integer >= 1",
        "quant.type='nf3' should be one of nf4, fp4, int8",
    ):
        assert part in message


def test_wrong_types_are_named():
    problems = config_problems(_cfg("adapter.r=sixteen", "data.packing=maybe", "trainer.devices=0"))
    assert problems == [
        "adapter.r='sixteen' should be a positive integer, e.g. 16",
        "trainer.devices=0 should be an integer >= 1, or auto",
        "data.packing='maybe' should be true, false or padding_free",
    ]


def test_incompatible_combinations():
    problems = config_problems(_cfg("quant=int8", "quant.compute_dtype=bf16", "adapter.init=loftq"))
    assert "quant.type=int8 cannot compute in bf16; use quant.compute_dtype=fp16, fp32 or auto" in problems
    assert "adapter.init=loftq needs a 4-bit quant.type (nf4 or fp4)" in problems
    assert "trainer.optimizer=paged_adamw_8bit needs a GPU; use adamw on CPU" in config_problems(
        _cfg("trainer.optimizer=paged_adamw_8bit")
    )
    assert "adapter.init=loftq and adapter.use_dora=true cannot be combined; choose one" in config_problems(
        _cfg("adapter.init=loftq", "adapter.use_dora=true")
    )


def test_more_cpu_processes_than_cores():
    import os

    cores = os.cpu_count()
    problems = config_problems(_cfg(f"trainer.devices={cores + 1}"))
    assert problems == [f"trainer.devices={cores + 1} CPU processes is more than this machine's {cores} cores"]


# Every rule across keys: the overrides that break it, and the same overrides less the one that
# completes the pair (fine alone), so each rule is shown to need both sides. The messages are
# pinned word for word: each names the keys and the fix.
COMPOUND_RULES = [
    (  # QuantConfig (core/quantize.py)
        ("quant=int8", "quant.compute_dtype=bf16"),
        "quant.type=int8 cannot compute in bf16; use quant.compute_dtype=fp16, fp32 or auto",
    ),
    (
        ("quant=int8", "quant.quant_storage=bf16"),
        "quant.quant_storage applies to 4-bit types only; keep uint8 with int8",
    ),
    (  # AdapterConfig (core/adapters.py)
        ("adapter.use_dora=true", "adapter.init=loftq"),
        "adapter.init=loftq and adapter.use_dora=true cannot be combined; choose one",
    ),
    (  # DataConfig (app/config.py)
        ("data.val_fraction=0.5", "data.test_fraction=0.5"),
        "data.val_fraction + data.test_fraction should leave rows to train on (sum below 1)",
    ),
    (  # TrainerConfig (app/config.py)
        ("trainer.val_check_interval=null", "trainer.early_stopping.patience=3"),
        "trainer.early_stopping.patience counts validations during fit; set trainer.val_check_interval too"
        " (optimizer steps)",
    ),
    (  # the recipe's task metric (app/config.py)
        ("recipe=legal", "~recipe.mode"),
        "recipe.metric is set alone; a recipe sets recipe.metric and recipe.mode (max or min) together",
    ),
    (  # app/config.py's rules across groups
        ("quant.keep_high_precision=0.05", "quant=int8"),
        "quant.keep_high_precision promotes 4-bit layers to int8; use it with nf4 or fp4",
    ),
    (
        ("quant.keep_high_precision=0.05", "model.low_memory=true"),
        "quant.keep_high_precision measures the unquantized weights; set model.low_memory=false",
    ),
    (
        ("adapter.init=loftq", "quant=int8"),
        "adapter.init=loftq needs a 4-bit quant.type (nf4 or fp4)",
    ),
    (
        ("adapter.init=loftq", "model.low_memory=true"),
        "adapter.init=loftq needs the unquantized weights; set model.low_memory=false",
    ),
    (
        ("model.low_memory=true", "measure_quant_cost=true"),
        "measure_quant_cost=true validates the unquantized base; set model.low_memory=auto or false",
    ),
    (
        ("trainer=ddp", "trainer.accelerator=cpu", "measure_quant_cost=true"),
        "measure_quant_cost=true runs in one process; set trainer.devices=1 (trainer=cpu or gpu)",
    ),
    (
        ("trainer=gpu", "trainer.accelerator=cpu", "trainer.optimizer=paged_adamw_8bit"),
        "trainer.optimizer=paged_adamw_8bit needs a GPU; use adamw on CPU",
    ),
    (
        ("trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "quant.quant_storage=uint8"),
        "FSDP can only shard float storage: set quant.quant_storage=auto (or bf16) with trainer=fsdp",
    ),
    (
        ("trainer=ddp", "quant.quant_storage=uint8", "trainer.strategy=fsdp"),
        "FSDP can only shard float storage: set quant.quant_storage=auto (or bf16) with trainer=fsdp",
    ),
]


@pytest.mark.parametrize(("overrides", "problem"), COMPOUND_RULES, ids=[" ".join(o) for o, _ in COMPOUND_RULES])
def test_each_rule_across_keys_fires_on_the_pair_only(overrides, problem):
    assert config_problems(_cfg(*overrides)) == [problem]
    assert config_problems(_cfg(*overrides[:-1])) == []
    with pytest.raises(ValueError, match=rf"^config has problem: {re.escape(problem)}\.$"):
        validate_config(_cfg(*overrides))
