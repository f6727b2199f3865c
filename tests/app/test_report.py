"""app/report.py: the task-metric curve and the report's section on which adapter adapter/ holds."""

from omegaconf import OmegaConf

from lightning_qlora.app.report import plot_metric, write_report

CFG = OmegaConf.create(
    {
        "recipe": {"name": "medical"},
        "model": {"name_or_path": "tiny"},
        "quant": {"type": "nf4", "double_quant": True},
        "adapter": {"r": 4, "alpha": 8},
        "trainer": {"max_steps": 30, "lr": 3e-4},
        "data": {"batch_size": 4},
    }
)
RESULT = {"before": {"val_choice_acc": 0.44}, "after": {"val_choice_acc": 0.62}, "test": {}}


def test_the_curve_marks_the_adapter_kept(tmp_path):
    png = tmp_path / "metric_curve.png"
    assert plot_metric([], "val_choice_acc", png) is False and not png.exists()
    assert plot_metric([[0, 0.44], [10, 0.62], [20, 0.58]], "val_choice_acc", png, best_step=10)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_says_which_adapter_was_kept_and_shows_the_curve(tmp_path):
    chosen = {"metric": "val_choice_acc", "mode": "max", "kept": "best", "step": 10, "score": 0.62, "last_step": 20}
    (tmp_path / "metric_curve.png").write_bytes(b"")
    write_report(tmp_path / "report.md", CFG, {**RESULT, "adapter": {**chosen, "stopped_early": True}}, [], "x")
    text = (tmp_path / "report.md").read_text()
    assert "## Task metric: val_choice_acc (max)" in text
    assert "`adapter/` is the best adapter by val_choice_acc: 0.6200 at step 10 of 20;" in text
    assert "Training stopped early at step 20" in text
    assert "![val_choice_acc at each validation](metric_curve.png)" in text

    last = {**chosen, "kept": "last", "step": 20, "score": None, "stopped_early": False}
    write_report(tmp_path / "report.md", CFG, {**RESULT, "adapter": last}, [], "x")
    text = (tmp_path / "report.md").read_text()
    assert "`adapter/` is the last adapter (step 20): no validation during training chose one." in text
    assert "stopped early" not in text
