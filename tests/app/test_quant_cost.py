"""measure_quant_cost=true: the unquantized base's validation loss beside the quantized one's, at setup."""

import pytest

from tests.app.test_train import _compose
from tests.cli.conftest import tiny_model_dir  # noqa: F401 (a session fixture, shared with the CLI tests)


def test_the_cost_compares_the_unquantized_base_with_the_runs_before(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    import lightning as L

    from lightning_qlora.app.build import build_data
    from lightning_qlora.app.splits import load_splits, task_of
    from lightning_qlora.app.train import run
    from lightning_qlora.io.models import load_tokenizer
    from lightning_qlora.tasks import CausalLMModule

    out = tmp_path / "run"
    overrides = ("recipe=medical", f"model.name_or_path={tiny_model_dir}", "data.batch_size=4", "sample_prompts=0")
    cfg = _compose(*overrides, "trainer.max_steps=1", "measure_quant_cost=true", f"output_dir={out}")
    result = run(cfg)
    cost = result["quant_cost"]

    # The unquantized figure, computed here by a plain fp32 validation of the same base on the same rows.
    task = task_of(cfg.data)
    dm = build_data(cfg, task, load_tokenizer(str(tiny_model_dir)), load_splits(cfg.data, task, cfg.seed)[0])
    plain = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    expected = plain.validate(CausalLMModule(str(tiny_model_dir)), dm, verbose=False)[0]["val_loss"]
    assert cost["val_loss_unquantized"] == pytest.approx(float(expected), abs=1e-4)
    # The quantized figure is the run's own "before": the same model, its frozen weights in NF4.
    assert cost["val_loss_quantized"] == result["before"]["val_loss"]
    assert abs(cost["val_loss_quantized"] - cost["val_loss_unquantized"]) > 1e-4  # NF4 changed the function
    assert cost["increase"] == pytest.approx(cost["val_loss_quantized"] / cost["val_loss_unquantized"] - 1, abs=1e-4)
    assert cost["quant_type"] == "nf4"
    line = f"nf4 costs {cost['increase']:+.1%} loss on this data"
    assert line in capsys.readouterr().out and line in (out / "report.md").read_text()
