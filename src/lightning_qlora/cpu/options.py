"""``CPUOptions``: the one switchboard of the CPU fast path, validated in one place.

The plugin and ``prepare`` used to take these as loose keywords (``cpu_reuse_recompute=...``,
``reuse_recompute=...``); :func:`options_from_aliases` keeps those working, with a
``DeprecationWarning`` naming the replacement.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class CPUOptions:
    """How training on CPU saves memory and repeated work; no option changes a result's bits but ``fast_dropout``.

    Every option acts only when the model trains on CPU; on a GPU the path is stock.

    Args:
        mmap_threshold: Pin glibc's mmap threshold to this many bytes (e.g. ``65536``): every larger
            buffer gets its own mapping and is returned on free, so the peak RSS at large batches
            drops, at the cost of slower steps (page faults). ``None`` leaves glibc's default.
        release_memory: Hand freed heap pages back to the OS (``malloc_trim``) after setup, and
            after an optimizer step when RSS has crept 25% above its lowest post-step value.
        reuse_recompute: Under gradient checkpointing, let the backward use the dense weights the
            recompute dequantized and replay the forward's LoRA dropout masks, instead of computing
            both again (:mod:`lightning_qlora.cpu.recompute`); bit-identical results. ``False``
            runs stock bitsandbytes and PEFT layers.
        fast_dropout: With ``reuse_recompute``, draw the LoRA dropout masks from 8 random bits per
            element instead of torch's 64 (:mod:`lightning_qlora.cpu.dropout`): the same Bernoulli
            distribution from another random stream, so not bit-equal to PEFT's. ``False`` draws
            torch's masks.
        reentrant_checkpoint: In a single process, run gradient checkpointing reentrant (PEFT's
            default) instead of non-reentrant: the backward frees each recomputed block at once, and
            glibc's heap, hence peak RSS, stays smaller at long sequences. Results are bit-identical.
            Distributed runs (DDP, FSDP) keep non-reentrant checkpointing.
    """

    mmap_threshold: int | None = None
    release_memory: bool = True
    reuse_recompute: bool = True
    fast_dropout: bool = True
    reentrant_checkpoint: bool = True

    def __post_init__(self) -> None:
        threshold = self.mmap_threshold
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int) or threshold <= 0):
            raise ValueError(
                f"CPUOptions(mmap_threshold={threshold!r}): expected a positive whole number of bytes"
                " (e.g. 65536), or None to keep glibc's default."
            )
        for field in ("release_memory", "reuse_recompute", "fast_dropout", "reentrant_checkpoint"):
            value = getattr(self, field)
            if not isinstance(value, bool):
                raise ValueError(f"CPUOptions({field}={value!r}): expected True or False.")


def options_from_aliases(
    cpu: CPUOptions | None,
    given: Mapping[str, Any],
    aliases: Mapping[str, str],
    owner: str,
) -> CPUOptions:
    """``cpu``, or the :class:`CPUOptions` that deprecated keywords describe.

    Args:
        cpu: The options passed as ``cpu=``, if any.
        given: The extra keywords the caller received (``**kwargs``).
        aliases: ``{deprecated keyword: CPUOptions field}`` that ``owner`` still accepts.
        owner: The callable's name, for the messages (e.g. ``"QLoRAPlugin"``).

    Raises:
        TypeError: a keyword in ``given`` is not one of ``aliases``.
        ValueError: both ``cpu`` and a deprecated keyword were given.
    """
    for key in given:
        if key not in aliases:
            raise TypeError(f"{owner}() got an unexpected keyword argument {key!r}")
    if cpu is not None and not isinstance(cpu, CPUOptions):
        raise TypeError(f"{owner}(cpu={cpu!r}): expected a CPUOptions, e.g. cpu=CPUOptions(release_memory=False).")
    if not given:
        return cpu if cpu is not None else CPUOptions()
    if cpu is not None:
        old, value = next(iter(given.items()))
        raise ValueError(
            f"{owner}() got both cpu= and the deprecated {old}={value!r}; pass only cpu=, with"
            f" {aliases[old]}={value!r} in its CPUOptions."
        )
    for key, value in given.items():
        warnings.warn(
            f"{owner}({key}=...) is deprecated; pass {owner}(cpu=CPUOptions({aliases[key]}={value!r})) instead.",
            DeprecationWarning,
            stacklevel=_caller_outside_package(),
        )
    return CPUOptions(**{aliases[key]: value for key, value in given.items()})


def _caller_outside_package() -> int:
    """The ``stacklevel`` of the first caller outside ``lightning_qlora``, so a warning names the user's line."""
    frame, level = sys._getframe(1), 1  # the frame that calls warnings.warn
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith("lightning_qlora."):
        frame, level = frame.f_back, level + 1
    return level
