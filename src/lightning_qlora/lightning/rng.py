"""Random-number state in checkpoints, per rank, so that a resumed run draws what it would have.

LoRA dropout draws from torch's generators. Each rank keeps its own stream (the CUDA one is
per device), so a checkpoint records every rank's state and each rank restores its own.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import torch

log = logging.getLogger(__name__)


def rng_states() -> dict[str, Any]:
    """This process's RNG states: torch's CPU generator, Python's, and its current CUDA device's."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()  # this rank's device only
    return states


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's :func:`rng_states`, by global rank; a collective when a process group is up."""
    mine = rng_states()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [mine]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


def rng_states_of_this_rank(state: dict[str, Any]) -> dict[str, Any] | None:
    """The saved RNG states this rank resumes with, from a plugin state written by any version."""
    ranks = state.get("rng_ranks")
    if not ranks:
        return state.get("rng")  # written before per-rank states: one process's
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if len(ranks) != world:
        if rank == 0:
            log.warning(
                "the checkpoint holds RNG states of %d ranks and this run has %d: dropout masks will differ"
                " from an uninterrupted run (resume with the same number of processes to keep them)",
                len(ranks),
                world,
            )
        return ranks[rank % len(ranks)]
    return ranks[rank]


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore :func:`rng_states`; a CUDA state goes to the current device only."""
    torch.set_rng_state(states["torch"])
    python = states["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    cuda = states.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    if isinstance(cuda, (list, tuple)):
        # Older checkpoints hold every visible device's state, all of them rank 0's.
        index = torch.cuda.current_device()
        if index >= len(cuda):
            log.warning("the checkpoint has no CUDA RNG state for device %d; its stream starts afresh", index)
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda)


class ResumableRNG:
    """Every rank's RNG states for a checkpoint, set again right before the first step after a resume.

    Restored there, not when the checkpoint loads, so that LoRA dropout draws the masks an
    uninterrupted run would have drawn.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """``{"rng": rank 0's states, "rng_ranks": every rank's}``; a collective when a process group is up."""
        ranks = gather_rng_states()
        return {"rng": ranks[0], "rng_ranks": ranks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep this rank's saved states for :meth:`restore`."""
        self._pending = rng_states_of_this_rank(state)

    def restore(self) -> None:
        """Set the states kept by :meth:`load_state_dict`, once; nothing when none are pending."""
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None
