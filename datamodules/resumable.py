"""A training order that a resumed run continues exactly, mid-epoch included.

Lightning saves the state of every training DataLoader that has ``state_dict``/``load_state_dict``
(its stateful-loader protocol, the one torchdata's ``StatefulDataLoader`` follows) in the
checkpoint, and loads it before iterating again on resume. :class:`ResumableDataLoader` records
the epoch and how many batches of it were handed out; :class:`EpochShuffleSampler` draws epoch
e's order from its own generator seeded with ``seed + e`` (never the global random state), so a
resumed run skips exactly the batches already trained on and sees the same frames as an
uninterrupted run. Used by the training loaders of :mod:`datamodules.avatar` and
:mod:`datamodules.mesh_views`; the random states of the training steps themselves are restored
by :class:`lightning_modules.resume.RandomState`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["EpochShuffleSampler", "ResumableDataLoader"]


def _process_group() -> tuple[int, int]:
    """(world size, rank) of the initialised default process group, else (1, 0)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class EpochShuffleSampler(DistributedSampler):
    """Dataset indices of one epoch: a permutation drawn from ``seed + epoch`` (or in order), per rank.

    A :class:`~torch.utils.data.DistributedSampler` (so Lightning keeps it under DDP instead of
    wrapping it): rank r takes every ``num_replicas``-th index of the epoch's order, padded to equal
    length; in one process it is a seeded shuffle of the whole dataset. Lightning calls
    :meth:`set_epoch` at every epoch start. :meth:`resume_at` makes the next pass over ``epoch``
    start after its first ``samples`` indices (a pass over another epoch drops that request).

    Args:
        data_source: the dataset (only ``len`` is used).
        shuffle: draw a permutation per epoch (False: dataset order).
        seed: the permutation of epoch e comes from a ``torch.Generator`` seeded with ``seed + e``.
        num_replicas, rank: default the initialised process group's, else 1 and 0.

    Raises:
        ValueError: an invalid ``rank`` (from DistributedSampler).
    """

    def __init__(
        self,
        data_source: Dataset,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        world, own_rank = _process_group()
        super().__init__(
            data_source,
            num_replicas=world if num_replicas is None else num_replicas,
            rank=own_rank if rank is None else rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=False,
        )
        self._resume: tuple[int, int] | None = None  # (epoch, indices of it already consumed)

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s order for the next pass (Lightning calls this at each epoch start)."""
        if self._resume is not None and self._resume[0] != epoch:
            self._resume = None  # the saved position belongs to another epoch: start this one afresh
        super().set_epoch(epoch)

    def resume_at(self, epoch: int, samples: int) -> None:
        """Make the next pass over ``epoch`` skip its first ``samples`` indices (of this rank).

        Raises:
            ValueError: ``samples`` outside [0, len(self)] or a negative ``epoch``.
        """
        if epoch < 0 or not 0 <= samples <= self.num_samples:
            raise ValueError(f"resume_at: need epoch >= 0 and 0 <= samples <= {self.num_samples}, got {epoch}, {samples}")
        super().set_epoch(epoch)
        self._resume = (epoch, samples)

    @property
    def pending_skip(self) -> int:
        """How many indices the next pass skips (0 unless :meth:`resume_at` applies to this epoch)."""
        return self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0

    def __iter__(self) -> Iterator[int]:
        skip = self.pending_skip
        self._resume = None  # one pass only
        indices = list(super().__iter__())  # this rank's share of epoch `self.epoch`'s order
        return iter(indices[skip:])


class ResumableDataLoader(DataLoader):
    """A training DataLoader whose position (epoch, batches handed out) is saved in the checkpoint.

    Iterates like ``DataLoader(dataset, batch_size, shuffle=shuffle)`` through an
    :class:`EpochShuffleSampler`; it draws nothing from the global random state (worker seeds come
    from its own generator), so loading data never shifts the random numbers of training. Lightning
    calls :meth:`state_dict` when it writes a checkpoint and :meth:`load_state_dict` before it
    iterates again on resume; the next pass then starts after the batches already trained on. The
    position is counted when batches are handed out (Lightning fetches nothing ahead from a loader
    with a length). An iteration starts its work at the first ``next``, after Lightning's
    ``set_epoch``, so the epoch's order is the right one with workers too.

    Args:
        dataset: map-style dataset.
        batch_size: samples per batch (the last batch of an epoch may be smaller).
        shuffle: a new seeded order every epoch (False: dataset order).
        seed: shuffling seed (None: ``torch.initial_seed()``, i.e. ``seed_everything``'s seed).
        **kwargs: other DataLoader arguments (``num_workers``, ``collate_fn``, ...); not
            ``sampler``/``batch_sampler``/``drop_last``.

    Raises:
        ValueError: ``sampler``, ``batch_sampler`` or ``drop_last`` given, or ``batch_size`` < 1.
    """

    def __init__(
        self, dataset: Dataset, batch_size: int = 1, shuffle: bool = False, seed: int | None = None, **kwargs: Any
    ) -> None:
        clashing = sorted({"sampler", "batch_sampler", "drop_last"} & {k for k, v in kwargs.items() if v})
        if clashing:
            raise ValueError(f"ResumableDataLoader chooses its own sampler; do not pass {clashing}")
        if batch_size is None or batch_size < 1:
            raise ValueError(f"ResumableDataLoader needs batch_size >= 1, got {batch_size}")
        for key in ("sampler", "batch_sampler", "drop_last"):
            kwargs.pop(key, None)
        seed = torch.initial_seed() % 2**62 if seed is None else int(seed)
        kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
        sampler = EpochShuffleSampler(dataset, shuffle=shuffle, seed=seed)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self._epoch = 0  # epoch of the current (or last) pass
        self._batches = 0  # batches of it handed out, including those skipped on resume

    def __iter__(self) -> Iterator[Any]:
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        # runs at the first next(): Lightning has called set_epoch for this pass by then
        sampler: EpochShuffleSampler = self.sampler
        self._epoch, self._batches = sampler.epoch, sampler.pending_skip // self.batch_size
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """The position: ``epoch``, ``batches`` handed out in it, and what must match on load."""
        sampler: EpochShuffleSampler = self.sampler
        return {
            "epoch": self._epoch,
            "batches": self._batches,
            "batch_size": int(self.batch_size),
            "num_samples": int(sampler.num_samples),
            "seed": int(sampler.seed),
            "shuffle": int(sampler.shuffle),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue after the saved position; the next pass over the saved epoch skips its handed-out batches.

        A checkpoint from a loader with another batch size or number of samples per rank cannot be
        continued mid-epoch: a warning, and the epoch restarts from its beginning.
        """
        sampler: EpochShuffleSampler = self.sampler
        sampler.seed, sampler.shuffle = int(state["seed"]), bool(state["shuffle"])
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if (state["batch_size"], state["num_samples"]) != (self.batch_size, sampler.num_samples):
            warnings.warn(
                f"the checkpoint's training loader had batch_size {state['batch_size']} and {state['num_samples']} "
                f"samples per rank, this one {self.batch_size} and {sampler.num_samples}: epoch {epoch} restarts "
                "from its first batch instead of continuing mid-epoch",
                stacklevel=2,
            )
            batches = 0
        sampler.resume_at(epoch, min(batches * self.batch_size, sampler.num_samples))
        self._epoch, self._batches = epoch, batches
