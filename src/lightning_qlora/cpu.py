"""CPU defaults: stop glibc from keeping freed activations resident.

glibc serves allocations above its mmap threshold with ``mmap`` and returns them to the OS
on free, but it raises that threshold (up to 32 MiB) each time such a block is freed.
After the first training step most activation buffers fall under the raised threshold,
land on the heap, and stay resident when freed: a 135M model at batch 4 x 512 then peaks
at 5.6 GB of RSS instead of 2.0 GB (bench/results/estimate_vs_measured.json). Pinning the
threshold keeps large blocks on ``mmap``, the same as ``MALLOC_MMAP_THRESHOLD_=65536``.
"""

from __future__ import annotations

import ctypes
import platform

_M_MMAP_THRESHOLD = -3  # mallopt parameter number, from glibc's malloc.h
_applied: int | None = None


def pin_mmap_threshold(threshold: int = 64 * 1024) -> bool:
    """Pin glibc's mmap threshold for this process (once); False where there is no glibc.

    Args:
        threshold: Allocations of at least this many bytes get their own mapping.
    """
    global _applied
    if threshold <= 0:
        raise ValueError(f"threshold={threshold} should be a positive number of bytes, e.g. 65536.")
    if _applied is not None:
        return _applied == threshold
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # musl or another libc: nothing to pin
        return False
    if ok:
        _applied = threshold
    return ok
