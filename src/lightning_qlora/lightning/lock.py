"""One run at a time per output_dir: an OS lock that rank 0 holds for the run's life.

Two runs started on one directory would interleave their checkpoints, logs and adapters. The
lock is ``flock`` on ``output_dir/.lightning_qlora.lock``: the kernel releases it when its
holder exits in any way, SIGKILL included, so a requeued job (``resume=auto``/``last``) is never
refused by a dead run's lock. Once it holds the lock, a run may clear what a killed run's writes
left behind (:func:`~lightning_qlora.io.atomic.remove_stale_temps`): no other process writes there.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
from pathlib import Path

from lightning_qlora.io.atomic import remove_stale_temps

log = logging.getLogger(__name__)
LOCK_FILE = ".lightning_qlora.lock"


class OutputDirInUse(OSError):
    """Another live process holds the output_dir's lock."""

    def __str__(self) -> str:
        return str(self.args[0])


class OutputDirLock:
    """An exclusive, non-blocking ``flock`` on ``directory/.lightning_qlora.lock`` (created if needed).

    Use as a context manager, or :meth:`acquire` and :meth:`release`. The file records its holder
    (host and pid) for the error another run gets; the lock itself is the kernel's, not the file's.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> OutputDirLock:
        """Take the lock, or raise :class:`OutputDirInUse` naming its holder."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            holder = self.path.read_text().strip() or "another process"
            raise OutputDirInUse(
                f"output_dir {str(self.directory)!r} is in use by another run ({holder} holds {self.path});"
                " wait for it to end, or choose another output_dir."
            ) from err
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Let the lock go (closing the file does); the file stays, for the next run to lock."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutputDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def remove_interrupted_writes(directory: str | os.PathLike) -> list[Path]:
    """Delete what killed writes left in ``directory`` and its ``checkpoints/``, naming it in one line.

    Call it while holding ``directory``'s :class:`OutputDirLock`: then no other process writes there.
    """
    directory = Path(directory)
    removed = [p for d in (directory, directory / "checkpoints") for p in remove_stale_temps(d)]
    if removed:
        names = ", ".join(str(p) for p in removed)
        log.warning("removed %d stale temp file(s) left by an interrupted write: %s", len(removed), names)
    return removed
