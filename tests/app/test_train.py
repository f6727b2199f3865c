"""app/train.py: where a run's rows come from."""

import pytest
from omegaconf import OmegaConf

from lightning_qlora.app.train import load_splits
from lightning_qlora.tasks.data import get_task


def test_a_recipe_with_neither_path_nor_sample_is_one_line():
    data = OmegaConf.create({"path": None, "sample_dir": None, "dataset": None, "val_fraction": 0.2})
    with pytest.raises(ValueError, match=r"^data.path and data.sample_dir are both null; set data.path=<your rows>"):
        load_splits(data, get_task("ag_news"), seed=0)


def test_a_shipped_sample_is_found_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipes/ folder here
    data = OmegaConf.create(
        {"path": None, "sample_dir": "recipes/classification/data", "dataset": "fancyzhx/ag_news", "val_fraction": 0.2}
    )
    splits, source = load_splits(data, get_task("ag_news"), seed=0)
    assert {k: len(v) for k, v in splits.items()} == {"train": 200, "validation": 60, "test": 60}
    assert "shipped sample of fancyzhx/ag_news" in source
