"""Writes that a kill or a full disk cannot leave half done, and what a killed write leaves behind.

Checkpoints (:class:`~lightning_qlora.lightning.checkpoint.AtomicCheckpointIO`) and adapter exports
are written under a temporary name beside their target, then renamed. A SIGKILL in between leaves
the temporary file or folder, which :func:`remove_stale_temps` deletes at the next start; a full disk
gives a one-line :class:`DiskFullError` naming the path, whatever layer (torch's zip writer,
safetensors) met it first.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def umask() -> int:
    """This process's umask (reading it means setting it: set it back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Why a write fails when the disk is full, or a file would outgrow the file-size limit (ulimit -f).
_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class DiskFullError(OSError):
    """A checkpoint or an adapter could not be written: no space left, or the file-size limit reached."""

    def __str__(self) -> str:
        return str(self.args[1] if len(self.args) > 1 else self.args[0])


def disk_full_error(err: BaseException, path: str | os.PathLike, what: str) -> DiskFullError | None:
    """A one-line :class:`DiskFullError` for writing ``what`` to ``path`` when ``err`` came from a full disk.

    ``err`` or an error it was raised from (``__cause__``/``__context__``) must be an ``OSError`` with
    ENOSPC, EFBIG or EDQUOT, or safetensors' error quoting one (``(os error 28)``); anything else is
    not a full disk, and gives ``None`` (the caller re-raises it unchanged).
    """
    seen, code = err, None
    for _ in range(8):  # the chain is short; a cycle must not hang
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in _FULL:
            code = seen.errno
            break
        if (m := re.search(r"\(os error (\d+)\)", str(seen))) and int(m.group(1)) in _FULL:
            code = int(m.group(1))
            break
        seen = seen.__cause__ or seen.__context__
    if code is None:
        return None
    return DiskFullError(
        code,
        f"could not write {what} {path}: disk full or file too large ({os.strerror(code)});"
        f" the previous {what} there, if any, is left as it was. Free space on that disk (or raise the"
        " file-size limit, ulimit -f), then run again (resume=last continues from the last checkpoint).",
    )


def write_text(path: str | os.PathLike, text: str, what: str) -> None:
    """Replace ``path`` with ``text`` whole or not at all: written beside it, then renamed over it.

    A full disk raises a one-line :class:`DiskFullError` naming ``what`` and ``path``, and leaves the
    previous file as it was; the temporary file is removed (or, after a SIGKILL, by
    :func:`remove_stale_temps`).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp's 0600 -> what a plain write would have made
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if (full := disk_full_error(err, path, what)) is not None:
            raise full from err
        raise


class RecordingFile:
    """A binary file whose failed ``write`` is remembered: torch's zip writer turns it into a RuntimeError."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self._f.flush()


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Clear what killed writes left in ``directory``; returns the paths deleted.

    :class:`~lightning_qlora.lightning.checkpoint.AtomicCheckpointIO` and the adapter export write to
    ``.NAME.XXXXXXXX.tmp`` (a file, or a folder), then rename it to ``NAME``; a SIGKILL before the rename
    leaves it behind, and it is deleted. An export moves the previous folder aside to ``.NAME.XXXXXXXX.old``
    first: one left behind is deleted when ``NAME`` exists, and renamed back to ``NAME`` when it does not
    (the kill fell between the two renames). Call it only while no other process writes there (the run's lock).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in sorted([*directory.glob(".*.tmp"), *directory.glob(".*.old")]):
        target = directory / path.name[1:].rsplit(".", 2)[0]
        if path.suffix == ".old" and not target.exists():
            os.replace(path, target)
            log.warning("restored %s from %s, left aside by an interrupted export", target, path)
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
