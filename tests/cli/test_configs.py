"""Every config in conf/ composes, and the stable keys are where the README says."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

CONF = Path(__file__).resolve().parents[2] / "conf"
GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONF.iterdir() if g.is_dir()}
STABLE_KEYS = (
    "model.name_or_path",
    "data.path",
    "trainer.max_steps",
    "trainer.devices",
    "quant.type",
    "adapter.r",
    "output_dir",
    "resume",
)


def test_every_group_has_options():
    assert set(GROUPS) == {"recipe", "model", "quant", "adapter", "trainer", "logger"}
    assert GROUPS["recipe"] == ["classification", "legal", "medical"]


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


def test_holding_out_validation_is_deterministic_by_seed():
    from lightning_qlora.app.train import _hold_out

    rows = [{"i": i} for i in range(20)]
    a = _hold_out({"train": rows}, 0.25, seed=3, source="x")
    b = _hold_out({"train": rows}, 0.25, seed=3, source="x")
    c = _hold_out({"train": rows}, 0.25, seed=4, source="x")
    assert a == b and a != c
    assert len(a["validation"]) == 5 and len(a["train"]) == 15
    assert sorted(r["i"] for r in a["train"] + a["validation"]) == list(range(20))
