"""app/train.py: where a run's rows come from, and what validation during fit keeps."""

import pytest
from omegaconf import OmegaConf

from lightning_qlora.app.splits import load_splits
from lightning_qlora.tasks.data import get_task
from tests.cli.conftest import tiny_model_dir  # noqa: F401 (a session fixture, shared with the CLI tests)


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


# --- Validation during fit: the task metric picks adapter/ (BestAdapter), early stopping ---------------


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    from lightning_qlora.cli.main import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_the_interval_counts_optimizer_steps_and_brings_the_best_adapter(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping

    from lightning_qlora.app.build import build_trainer
    from lightning_qlora.lightning.best import BestAdapter
    from lightning_qlora.lightning.callbacks import LoRAAdapters
    from lightning_qlora.lightning.validation import StepValidation

    cfg = _compose("recipe=medical", "trainer.val_check_interval=3", "trainer.accumulate_grad_batches=2")
    cfg.trainer.early_stopping.patience = 4
    trainer = build_trainer(cfg, tmp_path)
    assert (trainer.val_check_interval, trainer.check_val_every_n_epoch) == (6, None)  # 3 steps of 2 batches
    by_type = {type(c): c for c in trainer.callbacks}
    assert by_type[StepValidation].every_n_steps == 3
    assert by_type[LoRAAdapters].export_dir == tmp_path / "adapter-last"
    best, stop = by_type[BestAdapter], by_type[EarlyStopping]
    assert (best.monitor.metric, best.monitor.mode, best.export_dir) == ("val_choice_acc", "max", tmp_path / "adapter")
    assert (stop.monitor, stop.mode, stop.patience) == ("val_choice_acc", "max", 4)

    trainer = build_trainer(_compose(), tmp_path)  # no interval: validation before and after fit only
    assert not {BestAdapter, StepValidation, EarlyStopping} & {type(c) for c in trainer.callbacks}
    assert next(c for c in trainer.callbacks if isinstance(c, LoRAAdapters)).export_dir == tmp_path / "adapter"


def test_a_run_validating_during_fit_exports_and_measures_the_best_adapter(tiny_model_dir, tmp_path):  # noqa: F811
    import json

    from lightning_qlora.app.train import run
    from lightning_qlora.lightning.checkpoint import read_checkpoint

    out = tmp_path / "run"
    cfg = _compose(
        "recipe=classification",
        f"model.name_or_path={tiny_model_dir}",
        "trainer.max_steps=3",
        "trainer.val_check_interval=1",
        "trainer.accumulate_grad_batches=2",
        "trainer.early_stopping.patience=2",
        "data.batch_size=8",
        "sample_prompts=0",
        f"output_dir={out}",
    )
    result = run(cfg)
    chosen = result["adapter"]
    assert chosen["kept"] == "best" and chosen["metric"] == "val_macro_f1"
    steps = [step for step, _ in chosen["curve"]]
    assert steps == list(range(chosen["last_step"] + 1))  # before (0), then every optimizer step
    assert dict(map(tuple, chosen["curve"]))[chosen["step"]] == chosen["score"]
    # "after" re-measures the adapter kept, in place of the last one.
    assert result["after"]["val_macro_f1"] == pytest.approx(chosen["score"], abs=1e-4)
    meta = json.loads((out / "adapter" / "lightning_qlora.json").read_text())
    assert meta["selection"] == chosen and meta["metrics"]["after"] == result["after"]
    last = json.loads((out / "adapter-last" / "lightning_qlora.json").read_text())
    assert last["selection"] == {"kept": "last", "step": chosen["last_step"]} and last["metrics"] is None
    state = read_checkpoint(out / "checkpoints" / "last.ckpt")["callbacks"]
    saved = next(v for k, v in state.items() if k.startswith("BestAdapter"))
    assert (saved["best_step"], round(saved["best_score"], 4)) == (chosen["step"], chosen["score"])
    assert (out / "metric_curve.png").is_file()
    assert "![val_macro_f1 at each validation](metric_curve.png)" in (out / "report.md").read_text()


def test_a_task_metric_the_task_never_logs_fails_before_training(tiny_model_dir, tmp_path):  # noqa: F811
    from lightning_qlora.app.train import run

    out = tmp_path / "run"
    overrides = (f"model.name_or_path={tiny_model_dir}", "recipe=classification", "recipe.metric=val_choice_acc")
    with pytest.raises(ValueError) as err:
        run(_compose(*overrides, f"output_dir={out}"))
    message = str(err.value)
    assert message.startswith("metric 'val_choice_acc' is not logged by this task's validation, which logs val_acc,")
    assert "val_macro_f1" in message and "\n" not in message
    assert not (out / "adapter").exists() and not (out / "checkpoints").exists()  # nothing trained
