"""A training sampler that resumes mid-epoch where an interrupted run stopped.

Lightning restores the loop counters from a checkpoint, but a plain shuffled loader
starts its epoch over with a new order, so a resumed run sees other batches than an
uninterrupted one. This sampler draws each epoch's order from ``seed + epoch`` alone
(as ``DistributedSampler`` does, so Lightning neither wraps nor replaces it under DDP)
and skips the batches the checkpointed run had already consumed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

from torch.utils.data import DataLoader, DistributedSampler


class ResumableSampler(DistributedSampler):
    """Shuffle by ``seed + epoch``; on resume, skip the first ``skip_batches`` batches once.

    Args:
        dataset: The training examples.
        batch_size: Examples per batch on this rank (to turn batches into examples).
        seed: Base seed of the shuffle.
        num_replicas: Number of ranks (1 without DDP).
        rank: This rank.
        epoch: The epoch to start in (Lightning calls ``set_epoch`` at each epoch start too).
        skip_batches: Batches of the first epoch already trained on.
    """

    def __init__(
        self,
        dataset: Sized,
        batch_size: int,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        epoch: int = 0,
        skip_batches: int = 0,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        if skip_batches < 0:
            raise ValueError(f"skip_batches={skip_batches} should be >= 0.")
        self.batch_size = batch_size
        self.set_epoch(epoch)
        self._skip = skip_batches

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self._skip = self._skip * self.batch_size, 0
        return iter(indices[skip:])


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler`, marked resumable for Lightning.

    Its position comes from the loop counters Lightning restores, so the state it
    saves is only the seed, to catch a resume with another shuffle.
    """

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.sampler.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed") != self.sampler.seed:
            raise ValueError(
                f"the checkpoint was trained with seed={state.get('seed')}, this run uses seed={self.sampler.seed};"
                " resume with the same seed."
            )
