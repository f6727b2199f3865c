"""Real SIGKILLs on the default path, at seeded random moments: resume=last must end where an uninterrupted run ends.

Each test kills tests/lightning/kill_fit.py (gradient checkpointing on, LoRA dropout 0.1, recompute
reuse with replayed dropout masks) at a moment drawn from a seed, printed with the rerun command:
``LQ_FAULT_SEED=<seed> pytest tests/lightning/test_kill.py``. One moment is always inside a checkpoint
write, so that the killed write's temporary file is there for the next start to remove.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.lightning.kill_fit import MAX_STEPS

ROOT = Path(__file__).resolve().parents[2]
CHILD = ROOT / "tests" / "lightning" / "kill_fit.py"
PHASES = ("forward", "backward", "optimizer", "write")
# One thread: a tiny model gains nothing from two, and idle OpenMP threads spin on the CI's 2 cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def fault_seed() -> int:
    """``LQ_FAULT_SEED`` when set (to replay a failure), else a fresh one; printed either way."""
    seed = int(os.environ.get("LQ_FAULT_SEED") or random.SystemRandom().randrange(10**6))
    print(f"fault seed {seed} (replay: LQ_FAULT_SEED={seed} pytest {Path(__file__).relative_to(ROOT)})")
    return seed


def kill_at(command: list[str], marker: Path, log: Path, timeout: float = 300) -> int:
    """Start ``command``, wait until it writes ``marker`` (it is then at the chosen moment), SIGKILL it."""
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:  # also when the test fails here: no child outlives it
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
    assert marker.exists(), f"the run never reached the kill point:\n{log.read_text()[-3000:]}"
    return proc.returncode


@pytest.mark.parametrize("fast_dropout", [1, 0], ids=["cpu_fast_dropout", "torch_dropout"])
def test_sigkill_then_resume_last_ends_on_the_uninterrupted_adapter(fast_dropout, tmp_path):
    seed = fault_seed()
    rng = random.Random(f"{seed}-{fast_dropout}")
    phase = "write" if fast_dropout else rng.choice(PHASES)  # a write is always among the moments
    step = rng.randint(2, MAX_STEPS - 1)
    kill = f"{phase}:{step}" + (f":{rng.uniform(0.05, 0.95):.3f}" if phase == "write" else "")
    where = f"seed {seed}: SIGKILL at {kill}"
    print(where)
    out, marker, ref = tmp_path / "run", tmp_path / "marker", tmp_path / "reference"
    base = [sys.executable, str(CHILD), str(out), "--fast-dropout", str(fast_dropout)]

    code = kill_at([*base, "--kill", kill, "--marker", str(marker)], marker, tmp_path / "killed.log")
    assert code == -signal.SIGKILL, where
    # The last checkpoint is the previous step's, whole; a killed write left its temporary file.
    last = out / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == step - 1, where
    temps = sorted((out / "checkpoints").glob(".last.ckpt.*.tmp"))
    assert len(temps) == (phase == "write"), (where, temps)
    assert all(t.stat().st_size > 0 for t in temps), where

    result = subprocess.run(
        [*base, "--resume", "--reference", str(ref)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{where}\n{result.stderr[-3000:]}"
    assert f"kill_fit: trained steps {step}..{MAX_STEPS}" in result.stdout, where
    # The next start removed the temporary file, and said so in one line naming it.
    said = [line for line in result.stderr.splitlines() if "stale temp" in line]
    expected = [f"removed 1 stale temp file(s) left by an interrupted write: {temps[0]}"] if temps else []
    assert said == expected, where
    assert sorted((out / "checkpoints").iterdir()) == [last], where

    # Exact: the same arithmetic in the same order on the same number of threads, so any difference
    # is state that the checkpoint failed to carry (weights, AdamW moments, scheduler, sampler, RNG).
    resumed = load_file(out / "adapter" / "adapter_model.safetensors")
    expected_adapter = load_file(ref / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == expected_adapter.keys() and len(resumed) == 28
    for name, value in expected_adapter.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=lambda m, n=name: f"{where}: {n}: {m}")
