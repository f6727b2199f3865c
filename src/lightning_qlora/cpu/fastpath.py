"""The CPU fast path's entry points: :func:`apply` once a model has its adapters, and
:class:`CPUFastPath` for a training loop that also needs a hook after each optimizer step.

Callers (``QLoRAPlugin``, ``prepare``) hand over a :class:`~lightning_qlora.cpu.options.CPUOptions`
and never reach into the allocator, recompute or dropout modules themselves.
"""

from __future__ import annotations

import dataclasses
import gc
import logging

import torch
from torch import nn

from lightning_qlora.cpu.allocator import CreepGuard, copy_file_backed, pin_mmap_threshold, release_free_memory
from lightning_qlora.cpu.options import CPUOptions
from lightning_qlora.cpu.recompute import reuse_recomputation, use_reentrant_checkpointing

log = logging.getLogger(__name__)


@dataclasses.dataclass
class CPUReport:
    """What :func:`apply` did to a model.

    Attributes:
        layers: 4-bit layers swapped for ones that reuse the recompute's dense weight.
        dropouts: LoRA dropouts swapped for ones that replay the forward's mask.
        copied_bytes: Weights copied out of a memory-mapped checkpoint, so that the mapping can go.
        mmap_pinned: Whether glibc's mmap threshold is pinned to ``options.mmap_threshold``.
        reentrant: Checkpointed layers switched to reentrant checkpointing.
    """

    layers: int = 0
    reentrant: int = 0
    dropouts: int = 0
    copied_bytes: int = 0
    mmap_pinned: bool = False

    def summary(self) -> str:
        return (
            f"CPU fast path: {self.layers} 4-bit layers and {self.dropouts} dropouts reuse the recompute;"
            f" {self.copied_bytes} bytes copied out of mapped files; mmap threshold pinned: {self.mmap_pinned};"
            f" {self.reentrant} layers checkpoint reentrant"
        )


def apply(model: nn.Module, options: CPUOptions | None = None) -> CPUReport:
    """Set ``model`` up for training on CPU, in place; call it once its adapters exist.

    The layer swaps (``reuse_recompute``) happen wherever the model is: the swapped layers run the
    stock code off CPU, so a model set up on CPU may still move to a GPU. The process-wide parts
    (``mmap_threshold``, ``release_memory``) act only when the model's weights are on CPU.

    Args:
        model: A model with its LoRA adapters (a ``PeftModel``, the model inside it, or a module holding it).
        options: What to do; ``CPUOptions()`` when ``None``.

    Returns:
        What changed.
    """
    options = options or CPUOptions()
    report = CPUReport()
    if options.reuse_recompute:
        report.layers, report.dropouts = reuse_recomputation(model, fast_dropout=options.fast_dropout)
    if not all(t.device.type == "cpu" for t in model.parameters()):
        return report
    if options.reentrant_checkpoint and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        report.reentrant = use_reentrant_checkpointing(model)
    if options.mmap_threshold is not None:
        report.mmap_pinned = pin_mmap_threshold(options.mmap_threshold)
    if options.release_memory:
        # A weight left as a view of the mapped checkpoint (say the embedding) would keep every page read resident.
        report.copied_bytes = copy_file_backed(model)
        # Loading and quantizing leave the fp32 weights' freed pages on the heap. Collecting the young
        # generations frees setup's own cycles; a full collection walks every object the imports made
        # and freed no memory (bench/README.md, "Setup").
        gc.collect(1)
        release_free_memory()
    return report


class CPUFastPath:
    """The CPU fast path as a training loop drives it: :meth:`after_setup`, then :meth:`after_step` each step.

    Args:
        options: What to do; ``CPUOptions()`` when ``None``.
    """

    def __init__(self, options: CPUOptions | None = None) -> None:
        self.options = options or CPUOptions()
        self.active = False
        self._guard = CreepGuard()

    @property
    def trims(self) -> int:
        """How often :meth:`after_step` handed freed heap pages back to the OS."""
        return self._guard.trims

    def after_setup(self, module: nn.Module, device: torch.device | str) -> CPUReport | None:
        """:func:`apply` to ``module`` when it trains on CPU (``device``); ``None`` on other devices."""
        self.active = torch.device(device).type == "cpu"
        if not self.active:
            return None
        report = apply(module, self.options)
        log.debug("%s", report.summary())
        return report

    def after_step(self) -> bool:
        """Call after each optimizer step; True when it trimmed the heap."""
        if not (self.active and self.options.release_memory):
            return False
        # Only when RSS crept up: trimming every step re-faults the next step's activations.
        return self._guard.after_step()
