"""DDP on CPU: two processes (gloo), each quantizing its own copy, must end with identical adapters, and
with the adapter one process trains on the same rows."""

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _fit(out: Path, devices: int) -> None:
    out.mkdir(exist_ok=True)
    script = ROOT / "tests" / "lightning" / "ddp_fit.py"
    result = subprocess.run(
        [sys.executable, str(script), str(out), str(devices)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_process_ddp_keeps_adapters_in_sync_and_matches_one_process(tmp_path):
    _fit(tmp_path, devices=2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and len(rank0) == 28
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0, msg=name)
    # They trained: B started at zero and moved.
    assert any(t.abs().sum() > 0 for n, t in rank0.items() if "lora_B" in n)
    # Only rank 0 exported, once: each file of the export opened for writing once, and by rank 0 only.
    writes = [json.loads((tmp_path / f"exports{r}.json").read_text()) for r in (0, 1)]
    assert writes[1] == {}, writes
    assert {"adapter_config.json", "lightning_qlora.json"} <= set(writes[0]) and set(writes[0].values()) == {1}, writes
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    # One process at batch 8 on the same rows per step: DDP's averaged gradient is the one-process gradient
    # (every row holds as many loss tokens), so the adapters agree to float rounding after 6 AdamW steps.
    _fit(tmp_path / "one", devices=1)
    one = torch.load(tmp_path / "one" / "rank0.pt", weights_only=True)
    assert one.keys() == rank0.keys()
    for name in rank0:
        torch.testing.assert_close(rank0[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
