"""DDP on CPU: two processes (gloo), each quantizing its own copy, must end with identical adapters."""

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_two_process_ddp_keeps_adapters_in_sync(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "lightning" / "ddp_fit.py"), str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and len(rank0) == 28
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0, msg=name)
    # They trained: B started at zero and moved.
    assert any(t.abs().sum() > 0 for n, t in rank0.items() if "lora_B" in n)
    # Only rank 0 exported, once.
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
