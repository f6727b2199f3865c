"""Config validation before anything loads: every problem in one message."""

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
        "data.packing='maybe' should be true or false",
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
