"""`trainer=ddp` on two CPU processes with the default optimizer: `optimizer: auto` fits the device.

Before the optimizer group, trainer=ddp carried paged 8-bit AdamW, and this command stopped with
"paged_adamw_8bit needs a GPU; use adamw on CPU".
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DDP_ON_CPU = ("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=2")


def _train(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "train.py", *overrides], cwd=ROOT, capture_output=True, text=True, env=env, timeout=900
    )


def _check_run(result: subprocess.CompletedProcess, out: Path) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    config = (out / "config.yaml").read_text()
    assert "strategy: ddp" in config and "accelerator: cpu" in config
    assert "name: auto" in config  # the default optimizer, left to resolve on the device
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["after"]["val_loss"] != metrics["before"]["val_loss"]  # the AdamW steps trained
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two CPU processes need two cores")
def test_ddp_on_two_cpu_processes_as_documented(tmp_path):
    """The command exactly as the issue gives it, on the embedded default model."""
    out = tmp_path / "run"
    result = _train("recipe=classification", *DDP_ON_CPU, f"output_dir={out}")
    _check_run(result, out)
