"""CPU allocator policy: give freed activations back to the OS without slowing steps down.

With glibc's default (dynamic) mmap threshold, activation buffers land on the heap after the
first step, and memory freed between steps stays resident. Two remedies (measured in
``bench/README.md``, "Allocator policy"):

- ``release_free_memory`` (``malloc_trim(0)``): called after setup, and after a step through
  :class:`CreepGuard`, only when RSS has crept up. Trimming after every step would make each step
  fault its activations back in. It cannot lower the peak inside one step.
- ``pin_mmap_threshold(65536)``, opt-in as ``CPUOptions(mmap_threshold=65536)``: every large
  buffer gets its own mapping and goes back to the OS when freed, so the peak inside a step drops
  at large batches, but every fresh mapping is faulted in page by page, so steps are slower.
  ``lightning_qlora.app.estimate`` models this policy.
"""

from __future__ import annotations

from bisect import bisect_right

from torch import nn

from lightning_qlora.core.memory import _glibc, release_free_memory, rss_bytes

__all__ = ["CreepGuard", "copy_file_backed", "pin_mmap_threshold", "release_free_memory", "rss_bytes"]

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
    libc = _glibc()
    if libc is None:  # musl, macOS, Windows: nothing to pin
        return False
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    if ok:
        _applied = threshold
    return ok


class CreepGuard:
    """Trims the heap after a step only when RSS has crept up, not after every step.

    Trimming after every step hands the step's freed activations back to the OS, and the next
    step faults them all in again, for a peak barely lower (``bench/README.md``, "Trim only when
    RSS creeps"). Without trimming, the freed pages are reused from step to step and RSS after a
    step stays flat; trimming is still worth it when fragmentation makes it grow.

    Args:
        growth: Trim when RSS after a step exceeds the lowest RSS after any earlier
            untrimmed step by this factor.
    """

    def __init__(self, growth: float = 1.25) -> None:
        self.growth = growth
        self.floor: int | None = None
        self.trims = 0

    def after_step(self) -> bool:
        """Call after each optimizer step; True when it trimmed."""
        rss = rss_bytes()
        if rss is None:
            return False
        if self.floor is None or rss < self.floor:
            self.floor = rss
            return False
        if rss <= self.floor * self.growth:
            return False
        self.trims += 1
        return release_free_memory()


def _file_mappings() -> list[tuple[int, int]]:
    """Sorted ``(start, end)`` address ranges of this process's file-backed mappings (Linux)."""
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                # A path, not an anonymous region or one of [heap], [stack], [vdso]...
                if len(fields) == 6 and fields[5].startswith("/"):
                    start, end = fields[0].split("-")
                    ranges.append((int(start, 16), int(end, 16)))
    except OSError:
        return []
    return sorted(ranges)


def copy_file_backed(module: nn.Module) -> int:
    """Copy CPU tensors of ``module`` that live in a mapped file into memory; the bytes copied.

    transformers loads safetensors weights zero-copy: a weight of the file's dtype stays a view
    of the memory-mapped file, and one such view (say the embedding) keeps the whole mapping
    alive. Every page the loader read then stays resident, counted in RSS, long after the
    quantized layers dropped their fp32 weights: nearly the whole file for one embedding's worth
    of views (``bench/README.md``). Copying the few remaining views lets the mapping go.
    """
    ranges = _file_mappings()
    if not ranges:
        return 0
    starts = [r[0] for r in ranges]
    copied = 0
    tensors = [*module.parameters(), *module.buffers()]
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.is_meta or not tensor.numel():
            continue
        ptr = tensor.untyped_storage().data_ptr()
        i = bisect_right(starts, ptr) - 1
        if i >= 0 and ptr < ranges[i][1]:
            # .data keeps the Parameter object, so tied weights (embedding = head) stay tied.
            tensor.data = tensor.data.clone()
            copied += tensor.untyped_storage().nbytes()
    return copied
