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
from safetensors.torch import load_file

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
    assert {"val_loss", "val_acc"} <= set(metrics["after"])
    # The AdamW steps trained: every LoRA B starts at zero, and each one moved. (Not the loss:
    # the classification head starts random, and 2 steps can move its loss either way.)
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    untouched = [name for name, t in adapter.items() if "lora_B" in name and not t.abs().sum() > 0]
    assert untouched == [] and sum("lora_B" in name for name in adapter) == 2 * 7  # the tiny model: 2 blocks


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two CPU processes need two cores")
def test_ddp_on_two_cpu_processes_as_documented(tiny_model_dir, tmp_path):
    """The command as the issue gives it, on a tiny random model in place of the embedded one (suite time)."""
    out = tmp_path / "run"
    result = _train("recipe=classification", *DDP_ON_CPU, f"model.name_or_path={tiny_model_dir}", f"output_dir={out}")
    _check_run(result, out)
