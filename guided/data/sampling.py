"""Sharding across processes and an endless, resumable stream of batches.

Every epoch all ranks shuffle the indices with the same seeded permutation
(numpy default_rng([seed, epoch])), drop the last n % world_size of it so
the shards are equal, and rank r takes positions r::world_size.  Shards of
one epoch are therefore disjoint, and over epochs every image is seen.

`infinite_batches` walks those shards in batches (dropping a shard's last
partial batch, as the reference's DataLoader(drop_last=True) does) and
gives each item a seed of its own, so crops and flips do not depend on the
number of DataLoader workers.  `stream.state()` is {"epoch", "step"}: the
position of the next batch.  A stream built with that state, the same
dataset, seed, batch_size and world_size yields exactly the batches an
uninterrupted run would have yielded next.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from guided.errors import GuidedError


def shard_indices(n: int, rank: int = 0, world_size: int = 1, seed: int = 0, epoch: int = 0,
                  shuffle: bool = True) -> list[int]:
    """The indices rank `rank` reads in `epoch`: perm[:n - n % world_size][rank::world_size]."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise GuidedError(f"rank {rank} is not in 0..world_size-1 (world_size={world_size})")
    if n < world_size:
        raise GuidedError(f"the data set has {n} images, fewer than the {world_size} processes reading it")
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    return order[: n - n % world_size][rank::world_size].tolist()


class _Batches:
    """Index batches [(index, item_seed), ...] from a position on, forever."""

    def __init__(self, stream: "BatchStream"):
        self.s = stream
        self.start = (stream.epoch, stream.step)

    def __iter__(self):
        s, (epoch, step) = self.s, self.start
        while True:
            order = shard_indices(len(s.dataset), s.rank, s.world_size, s.seed, epoch)
            seeds = np.random.default_rng([s.seed, epoch, s.rank, 1]).integers(0, 2**62, len(order)).tolist()
            for b in range(step, s.batches_per_epoch):
                part = slice(b * s.batch_size, (b + 1) * s.batch_size)
                yield list(zip(order[part], seeds[part]))
            epoch, step = epoch + 1, 0


class BatchStream:
    """Iterable of (images, labels) batches, forever; see the module doc."""

    def __init__(self, dataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 num_workers: int = 0, state: dict | None = None, pin_memory: bool = False):
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        self.seed, self.num_workers, self.pin_memory = seed, num_workers, pin_memory
        if batch_size < 1:
            raise GuidedError(f"batch size must be at least 1, not {batch_size}")
        shard = len(shard_indices(len(dataset), rank, world_size, seed, 0, shuffle=False))
        self.batches_per_epoch = shard // batch_size
        if self.batches_per_epoch == 0:
            raise GuidedError(f"batch size {batch_size} is larger than this process's {shard} images; "
                              f"lower the batch size")
        state = state or {}
        self.epoch, self.step = int(state.get("epoch", 0)), int(state.get("step", 0))
        if not 0 <= self.step < self.batches_per_epoch:  # e.g. resumed with another batch size
            self.epoch, self.step = self.epoch + self.step // self.batches_per_epoch, 0

    def state(self) -> dict:
        return {"epoch": self.epoch, "step": self.step}

    def __iter__(self):
        loader = DataLoader(self.dataset, batch_sampler=_Batches(self), num_workers=self.num_workers,
                            pin_memory=self.pin_memory)
        for images, labels in loader:
            self.step += 1
            if self.step == self.batches_per_epoch:
                self.epoch, self.step = self.epoch + 1, 0
            yield images, torch.as_tensor(labels)


def infinite_batches(dataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                     num_workers: int = 0, state: dict | None = None) -> BatchStream:
    """(images, labels) batches forever, rank `rank`'s shard only, resumable via .state()."""
    return BatchStream(dataset, batch_size, rank, world_size, seed, num_workers, state)
