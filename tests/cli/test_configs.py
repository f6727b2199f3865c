"""Every config in conf/ composes, and the stable keys are where the README says."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[2] / "conf"
GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONF.iterdir() if list(g.glob("*.yaml"))}
STABLE_KEYS = (
    "model.name_or_path",
    "data.path",
    "data.max_length",
    "data.batch_size",
    "trainer.max_steps",
    "trainer.devices",
    "trainer.lr",
    "optimizer.name",
    "optimizer.lr",
    "quant.type",
    "adapter.r",
    "output_dir",
    "resume",
)


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_every_group_has_options():
    assert set(GROUPS) == {"recipe", "model", "quant", "adapter", "data", "optimizer", "trainer", "logger"}
    assert GROUPS["recipe"] == ["classification", "legal", "medical", "ner", "sentiment"]
    assert GROUPS["optimizer"] == ["adamw", "auto", "paged_adamw_8bit"]


@pytest.mark.parametrize(("group", "option"), [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_option_composes_with_the_stable_keys(group, option):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"{group}={option}"], return_hydra_config=True)
    for key in STABLE_KEYS:
        node = cfg
        for part in key.split("."):
            assert part in node, f"{key} missing with {group}={option}"
            node = node[part]
    from lightning_qlora.tasks.data.tasks import TASKS

    assert cfg.data.task in TASKS


@pytest.mark.parametrize("recipe", GROUPS["recipe"])
def test_recipes_hold_only_what_differs(recipe):
    """The data defaults are shared: a recipe sets no data key to the default's own value."""
    from omegaconf import OmegaConf

    shared = OmegaConf.load(CONF / "data" / "default.yaml")
    mine = OmegaConf.load(CONF / "recipe" / f"{recipe}.yaml")
    same = [k for k, v in mine.data.items() if k in shared and not OmegaConf.is_missing(shared, k) and v == shared[k]]
    assert same == []
    assert "lr" not in mine.get("trainer", {})  # the optimizer's settings live in its group


@pytest.mark.parametrize("trainer", GROUPS["trainer"])
def test_trainer_aliases_read_the_optimizer_group(trainer):
    from lightning_qlora.app.config import optimizer_settings

    cfg = _compose(f"trainer={trainer}", "optimizer.lr=1e-3", "optimizer=adamw")
    assert (cfg.trainer.lr, cfg.trainer.optimizer) == (1e-3, "adamw")
    assert optimizer_settings(cfg)["lr"] == 1e-3
    # Given on the command line, the old names still set the optimizer.
    cfg = _compose(f"trainer={trainer}", "trainer.lr=1e-4", "trainer.optimizer=adamw", "trainer.warmup_steps=7")
    assert optimizer_settings(cfg) == {"name": "adamw", "lr": 1e-4, "weight_decay": 0.0, "warmup_steps": 7}


def test_the_default_optimizer_fits_the_device():
    assert _compose().optimizer.name == "auto"
    assert _compose("trainer=ddp").optimizer.name == "auto"
    assert _compose("trainer=gpu", "recipe=legal").optimizer.warmup_steps == 30  # a GPU run is longer
    assert _compose("trainer=gpu", "recipe=medical").optimizer.warmup_steps == 10  # the recipe still wins


def test_holding_out_validation_is_deterministic_by_seed():
    from lightning_qlora.app.splits import hold_out

    rows = [{"i": i} for i in range(20)]
    data = OmegaConf.create({"val_fraction": 0.25, "test_fraction": 0.0})
    a, _ = hold_out({"train": rows}, data, seed=3, source="x")
    b, _ = hold_out({"train": rows}, data, seed=3, source="x")
    c, _ = hold_out({"train": rows}, data, seed=4, source="x")
    assert a == b and a != c
    assert len(a["validation"]) == 5 and len(a["train"]) == 15 and "test" not in a
    assert sorted(r["i"] for r in a["train"] + a["validation"]) == list(range(20))


def test_a_train_only_dataset_holds_out_validation_and_test_apart():
    from lightning_qlora.app.splits import hold_out

    rows = [{"i": i} for i in range(20)]
    data = OmegaConf.create({"val_fraction": 0.1, "test_fraction": 0.2})
    splits, note = hold_out({"train": rows}, data, seed=0, source="x")
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [14, 2, 4]
    assert sorted(r["i"] for s in splits.values() for r in s) == list(range(20))  # disjoint, nothing lost
    assert note == " (10% for validation and 20% for test held out of train by seed 0)"
    # A split the data has is never replaced.
    kept, _ = hold_out({"train": rows, "test": [{"i": -1}]}, data, seed=0, source="x")
    assert kept["test"] == [{"i": -1}] and len(kept["validation"]) == 2
    with pytest.raises(ValueError, match="x has 3 rows: too few to hold out validation and test splits"):
        hold_out({"train": rows[:3]}, OmegaConf.create({"val_fraction": 0.5, "test_fraction": 0.5}), 0, "x")
