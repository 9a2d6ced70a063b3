"""The training loader's sample order: endless, deterministic, and addressable by position.

Each reader (one rank's DataLoader worker) gets a :class:`ReaderPlan` over the shards' row
counts: the shards it owns (balanced by rows) or, with fewer shards than readers, a disjoint
stride of every shard; per epoch its shards are shuffled, cut into windows and each window's
samples permuted, all from ``numpy`` generators seeded with (seed, epoch, reader, window). So
sample ``m`` of a reader is a pure function of ``m``, and resuming jumps there by arithmetic::

    from pipeline.data.order import ReaderPlan
    plan = ReaderPlan(rows=[5, 5, 3], split=0, nsplit=2, seed=0, window=4)
    for epoch, (shard_ids, rows, augs), start in plan.from_position(123): ...

Used by :mod:`pipeline.data.loader`, which reads and decodes the samples.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from pipeline.data.embed import balanced_split


class ReaderPlan:
    """The endless, deterministic sample order of one reader, addressable by position.

    A *part* is (shard index, first row, row step): the rows of a shard this reader reads.
    """

    def __init__(self, rows: list[int], split: int, nsplit: int, seed: int, window: int):
        if len(rows) >= nsplit:
            # Balanced by rows: a short last shard must not give one reader a shorter
            # (so more often repeated) epoch.
            self.parts = [(s, 0, 1) for s in balanced_split(rows, nsplit)[split]]
        else:  # fewer shards than readers: a disjoint stride of every shard
            # Offset by the shard index so small shards don't all favour reader 0.
            self.parts = [(s, (split - s) % nsplit, nsplit) for s in range(len(rows))]
        self.counts = np.array([len(range(f, rows[s], st)) for s, f, st in self.parts])
        self.epoch_len = int(self.counts.sum())
        self.split, self.seed, self.window = split, seed, window

    def _windows(self, epoch: int) -> list[np.ndarray]:
        order = np.random.default_rng([self.seed, epoch, self.split, 1, 0])
        perm = order.permutation(len(self.parts))
        return [perm[i : i + self.window] for i in range(0, len(perm), self.window)]

    def _rows(self, p: int) -> np.ndarray:
        _, first, step = self.parts[p]
        return np.arange(first, first + step * self.counts[p], step)

    def window_items(self, epoch: int, w: int, parts: np.ndarray):
        """(shard index, row, augmentation draws [n, 3]) of window ``w``, in visit order."""
        shard = np.concatenate([np.full(self.counts[p], self.parts[p][0]) for p in parts])
        row = np.concatenate([self._rows(p) for p in parts])
        gen = np.random.default_rng([self.seed, epoch, self.split, 2, w])
        perm = gen.permutation(len(shard))
        return shard[perm], row[perm], gen.random((len(shard), 3))

    def from_position(self, position: int) -> Iterator[tuple[int, tuple, int]]:
        """Yield (epoch, window items, first index) from the sample at ``position`` on."""
        epoch, offset = divmod(position, self.epoch_len)
        while True:
            windows = self._windows(epoch)
            ends = np.cumsum([self.counts[parts].sum() for parts in windows])
            first_w = int(np.searchsorted(ends, offset, side="right"))
            start = offset - (int(ends[first_w - 1]) if first_w else 0)
            for w in range(first_w, len(windows)):
                yield epoch, self.window_items(epoch, w, windows[w]), start
                start = 0
            epoch, offset = epoch + 1, 0
