"""Launched by tests/cli/test_train.py: ``lightning-qlora train ...`` on a disk that is full after the first checkpoint.

The hook is here, in the test's child, not in the library: once ``AtomicCheckpointIO`` has written
its first checkpoint, no file of this process may grow past half that checkpoint's size (EFBIG, as
``ulimit -f`` makes it; SIGXFSZ ignored, as a shell's ``ulimit`` leaves it), so the next checkpoint
write fails the way a full disk makes it fail.
"""

import resource
import signal
import sys
from pathlib import Path

from lightning_qlora.cli.main import main
from lightning_qlora.lightning.checkpoint import AtomicCheckpointIO

_save = AtomicCheckpointIO.save_checkpoint


def save_then_fill_the_disk(self, checkpoint, path, storage_options=None):
    _save(self, checkpoint, path, storage_options)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (Path(path).stat().st_size // 2, hard))


AtomicCheckpointIO.save_checkpoint = save_then_fill_the_disk

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
