"""The training loader: a resumable sampler and the DataLoader over a :class:`~pipelines.cases.dataset.CaseDataset`.

Order: :class:`ResumableSampler` permutes the cases per epoch (the same permutation on every rank), strides
it over the ranks and remembers how many samples of the epoch it has delivered, so a resumed run continues
with exactly the next batch. The epoch reaches the workers with each index: :func:`build_loader` feeds the
dataset ``(epoch, index)`` pairs tagged with the sampler's epoch, and the dataset draws every random choice of
an item from ``numpy.random.default_rng([seed, epoch, index])``, so the same (seed, epoch, index) gives the same
tensors in any process or worker. Batches are dicts of the sample keys with B first
(:data:`~pipelines.cases.dataset.SAMPLE_KEYS`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

__all__ = ["ResumableLoader", "ResumableSampler", "build_loader", "collate"]


# ---------------------------------------------------------------------------------------------- the sampler


class ResumableSampler(Sampler[int]):
    """Per-epoch permutation shared by all ranks, strided over ranks, resumable mid-epoch.

    Epoch ``e`` permutes ``range(dataset_len)`` with ``torch.Generator().manual_seed(seed + e)`` (identity
    when ``shuffle=False``); ``drop_last=True`` truncates it to a multiple of ``world_size * batch_size`` so
    every rank gets the same number of full batches, ``drop_last=False`` pads it by wrapping around to a
    multiple of ``world_size``. Rank ``r`` takes positions ``r, r + world_size, ...``.

    ``position`` counts this rank's samples of the current epoch already delivered to the trainer. The
    loader of :func:`build_loader` advances it as it yields batches (prefetched batches do not count);
    without that loader call :meth:`advance`. :meth:`state_dict` / :meth:`load_state_dict` store and
    restore (epoch, position), so a resumed run continues with exactly the next batch. ``set_epoch(e)``
    with a new epoch restarts at position 0 (with the same epoch, e.g. right after loading a state, it keeps
    the position). Iterating after the epoch is exhausted moves on to the next epoch by itself.
    """

    def __init__(self, dataset_len: int, *, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, drop_last: bool = True) -> None:
        if dataset_len < 1:
            raise ValueError(f"dataset_len must be >= 1, got {dataset_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size), got rank {rank} of {world_size}")
        self.dataset_len, self.batch_size, self.seed = int(dataset_len), int(batch_size), int(seed)
        self.rank, self.world_size, self.shuffle, self.drop_last = int(rank), int(world_size), bool(shuffle), bool(drop_last)
        if self.drop_last and self.dataset_len < self.world_size * self.batch_size:
            raise ValueError(f"{self.dataset_len} cases give no full batch of {self.batch_size} on each of "
                             f"{self.world_size} rank(s) with drop_last=True; lower the batch size")
        self.epoch = 0
        self.position = 0

    @property
    def num_samples(self) -> int:
        """Samples of this rank per epoch."""
        step = self.world_size * self.batch_size
        if self.drop_last:
            return (self.dataset_len // step) * self.batch_size
        return math.ceil(self.dataset_len / self.world_size)

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.batch_size if self.drop_last else math.ceil(self.num_samples / self.batch_size)

    def __len__(self) -> int:
        return self.num_samples

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's whole share of ``epoch``, in order."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + int(epoch))
            order = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            order = list(range(self.dataset_len))
        total = self.num_samples * self.world_size
        if total <= len(order):
            order = order[:total]
        else:
            order = (order * math.ceil(total / len(order)))[:total]
        return order[self.rank::self.world_size]

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.epoch, self.position = int(epoch), 0

    def advance(self, num_samples: int) -> None:
        """Count ``num_samples`` of this rank as delivered (the loader does it per batch)."""
        self.position = min(self.num_samples, self.position + int(num_samples))

    def __iter__(self) -> Iterator[int]:
        if self.position >= self.num_samples:
            self.epoch, self.position = self.epoch + 1, 0
        yield from self.epoch_indices(self.epoch)[self.position:]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "global_position": self.position * self.world_size,
                "seed": self.seed, "dataset_len": self.dataset_len, "world_size": self.world_size,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "dataset_len"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(f"sampler state was saved with {key}={state[key]}, this sampler has "
                                 f"{getattr(self, key)}: the resumed run would not continue the same sequence")
        self.epoch = int(state["epoch"])
        if int(state.get("world_size", self.world_size)) == self.world_size:
            self.position = int(state["position"])
        else:
            g = int(state.get("global_position", int(state["position"]) * int(state["world_size"])))
            if g % self.world_size:
                raise ValueError(f"cannot resume a position of {g} samples on {self.world_size} ranks")
            self.position = g // self.world_size
        self.position = min(self.position, self.num_samples)


# ---------------------------------------------------------------------------------------------- the loader


class _EpochTagged(Sampler):
    """Yields ``(epoch, index)`` so workers use the sampler's epoch, even persistent ones."""

    def __init__(self, sampler: ResumableSampler) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return max(0, self.sampler.num_samples - self.sampler.position) or self.sampler.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in self.sampler:
            yield (self.sampler.epoch, i)


class ResumableLoader(DataLoader):
    """A DataLoader that advances its :class:`ResumableSampler` by each batch it hands out."""

    resumable_sampler: ResumableSampler

    def __iter__(self):  # type: ignore[override]
        for batch in super().__iter__():
            self.resumable_sampler.advance(int(batch["index"].shape[0]))
            yield batch


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a list of samples key by key (all tensors of one key have one shape)."""
    return default_collate(samples)


def _worker_init(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    seed = (info.seed if info is not None else worker_id) % 2**32
    np.random.seed(seed)
    import random

    random.seed(seed)
    torch.set_num_threads(1)


def build_loader(dataset: Dataset, sampler: ResumableSampler, *, batch_size: int, workers: int = 0,
                 pin_memory: bool = False, prefetch_factor: int | None = None) -> ResumableLoader:
    """A DataLoader over ``dataset`` in ``sampler`` order, collating dicts; advances the sampler per batch.

    Item randomness does not depend on the worker (module docstring); workers are seeded from the sampler
    seed for anything else, use one torch thread each and persist across epochs when ``workers > 0``.
    """
    if batch_size != sampler.batch_size:
        raise ValueError(f"batch_size {batch_size} differs from the sampler's {sampler.batch_size}")
    g = torch.Generator().manual_seed(sampler.seed * 1000003 + sampler.rank)
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(persistent_workers=True, worker_init_fn=_worker_init)
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
    loader = ResumableLoader(dataset, batch_size=batch_size, sampler=_EpochTagged(sampler), num_workers=workers,
                             collate_fn=collate, pin_memory=pin_memory, drop_last=sampler.drop_last, generator=g,
                             **kwargs)
    loader.resumable_sampler = sampler
    return loader
