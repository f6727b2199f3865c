"""Process memory: resident size, and handing freed heap pages back to the OS (glibc).

Low-memory loading and the CPU allocator policy both use these; nothing here imports torch.
"""

from __future__ import annotations

import ctypes
import os
import platform

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_libc: ctypes.CDLL | None = None
_looked = False


def _glibc() -> ctypes.CDLL | None:
    """glibc, or None on another OS or C library (looked up once: this runs every step)."""
    global _libc, _looked
    if not _looked:
        _looked = True
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                _libc = ctypes.CDLL("libc.so.6")
            except OSError:
                _libc = None
    return _libc


def release_free_memory() -> bool:
    """Hand the heap's free pages back to the OS (``malloc_trim(0)``); False where there is no glibc."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0) >= 0)


def rss_bytes() -> int | None:
    """Resident memory of this process now (Linux ``/proc/self/statm``); None elsewhere."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None
