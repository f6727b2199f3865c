"""What lightning-qlora 0.1.0 wrote (tests/fixtures/v0.1.0) still evaluates and resumes, from any directory."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.cli.conftest import run_cli

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "v0.1.0"
# The overrides of the run that wrote the fixture (its README), but 4 steps instead of 2.
FIXTURE_RUN = (
    "recipe=classification",
    "adapter.r=1",
    "adapter.target_modules=[q_proj]",
    "trainer.max_steps=4",
    "trainer.checkpoint_every_n_steps=2",
    "sample_prompts=0",
)


@pytest.mark.slow
def test_a_0_1_0_adapter_evaluates_from_another_directory(tmp_path):
    # 0.1.0 recorded its sample as recipes/classification/data, a path relative to its checkout:
    # from an empty directory, only the sample shipped in the package can answer it.
    result = run_cli(
        ["evaluate", "--adapter", str(FIXTURE / "adapter"), "--output", str(tmp_path / "m.json")],
        cwd=tmp_path,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ours = json.loads((tmp_path / "m.json").read_text())
    assert json.loads(result.stdout[result.stdout.index("{") :]) == ours
    recorded = json.loads((FIXTURE / "adapter" / "lightning_qlora.json").read_text())["metrics"]["test"]
    # What 0.1.0 recorded, and the per-class F1 that later versions add.
    per_class = {f"test_f1_{name}" for name in ("world", "sports", "business", "sci_tech")}
    assert set(ours) == set(recorded) | per_class
    # The same base, quantized the same way, with the same adapter, on the same rows.
    assert ours["test_loss"] == pytest.approx(recorded["test_loss"], abs=1e-3)
    assert ours["test_acc"] == pytest.approx(recorded["test_acc"])


@pytest.mark.slow
def test_a_0_1_0_checkpoint_resumes_at_its_step(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    shutil.copyfile(FIXTURE / "last.ckpt", ckpt)
    assert torch.load(ckpt, weights_only=True)["global_step"] == 2
    out = tmp_path / "run"
    result = run_cli(["train", *FIXTURE_RUN, f"output_dir={out}", f"resume={ckpt}"], cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming from {ckpt}" in result.stdout + result.stderr
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    # Lightning logs the loss of step s+1 at step s: a run that restarted at 0 would log step 0 or 1.
    import csv

    with (out / "logs" / "resumed_1" / "metrics.csv").open() as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train_loss")]
    assert steps and min(steps) >= 2, steps
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    meta = json.loads((out / "adapter" / "lightning_qlora.json").read_text())
    assert (meta["recipe"], meta["sample"]) == ("classification", "classification")
