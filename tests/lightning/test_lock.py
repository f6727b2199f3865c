"""Two runs on one output_dir: the second is refused while the first lives, and a SIGKILLed run's lock is free."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from lightning_qlora.lightning.lock import LOCK_FILE, OutputDirInUse, OutputDirLock

# A run's start as app/train.py's run() makes it (the lock, then the cleanup), then a run's writes:
# 20 lines, each naming the writer; it holds the lock until the test lets it go. It starts at the
# given time, so that two of them start at once.
START_AND_WRITE = """
import os, sys, time
from pathlib import Path
from lightning_qlora.lightning.lock import OutputDirLock, remove_interrupted_writes
out, start, release = Path(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3])
time.sleep(max(0.0, start - time.time()))
try:
    lock = OutputDirLock(out).acquire()
except OSError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
remove_interrupted_writes(out)
print(os.getpid(), flush=True)
for i in range(20):
    with open(out / "log.txt", "a") as f:
        f.write(f"{os.getpid()} {i}\\n")
    time.sleep(0.01)
deadline = time.time() + 120
while not release.exists() and time.time() < deadline:
    time.sleep(0.01)
"""

HOLD = """
import sys, time
from pathlib import Path
from lightning_qlora.lightning.lock import OutputDirLock
lock = OutputDirLock(Path(sys.argv[1])).acquire()
Path(sys.argv[2]).write_text("locked")
time.sleep(600)
"""


def test_two_runs_started_at_once_on_one_output_dir_one_is_refused(tmp_path):
    out, release = tmp_path / "run", tmp_path / "release"
    start = f"{time.time() + 1.0}"  # both wait for this moment: their imports are done by then
    command = [sys.executable, "-c", START_AND_WRITE, str(out), start, str(release)]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        deadline = time.monotonic() + 120  # until one has ended: refused (or, were the lock broken, done)
        while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        release.touch()  # the holder may end now
        results = [(p, *p.communicate(timeout=120)) for p in procs]
    assert sorted(p.returncode for p, _, _ in results) == [0, 2], [(p.returncode, e[-500:]) for p, _, e in results]
    (winner, pid, _), (_, _, refused) = sorted(results, key=lambda r: r[0].returncode)
    assert refused.count("\n") == 1 and refused.startswith(f"error: output_dir {str(out)!r} is in use by another run")
    assert f"pid {pid.strip()} holds {out / LOCK_FILE}" in refused
    # Nothing of the refused run is in the directory: every line is the winner's, in order.
    assert (out / "log.txt").read_text().splitlines() == [f"{pid.strip()} {i}" for i in range(20)]
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, "log.txt"]


def test_a_sigkilled_runs_lock_is_free_for_the_requeued_job(tmp_path):
    out, marker = tmp_path / "run", tmp_path / "locked"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out), str(marker)])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and holder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.exists(), "the holder never took the lock"
        with pytest.raises(OutputDirInUse, match=rf"in use by another run \(.* pid {holder.pid} holds"):
            OutputDirLock(out).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert holder.returncode == -signal.SIGKILL
    with OutputDirLock(out) as lock:  # the kernel let go of it with the process
        assert lock.path.read_text().split()[-1] == str(os.getpid())


def test_run_refuses_an_output_dir_another_run_holds(tmp_path):
    """app/train.py's run(), as the command line calls it: refused before it writes anything."""
    from hydra import compose, initialize_config_module

    from lightning_qlora.app.train import run

    out = tmp_path / "run"
    with initialize_config_module("lightning_qlora.conf", version_base="1.3"):
        # No model there: were the lock not held, the run would stop at the model, not train one.
        cfg = compose(
            "config", overrides=[f"output_dir={out}", "resume=auto", f"model.name_or_path={tmp_path / 'none'}"]
        )
    with OutputDirLock(out), pytest.raises(OutputDirInUse, match=r"^output_dir .* is in use by another run") as err:
        run(cfg)
    assert "\n" not in str(err.value) and isinstance(err.value, OSError)  # the CLI's one-line error path
    assert [p.name for p in out.iterdir()] == [LOCK_FILE]
