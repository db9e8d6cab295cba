"""Each rank's share of an in-memory split, and batches that keep every rank stepping in lockstep.

Rank r of W holds rows r, r + W, r + 2W, ... of a split (:func:`shard_rows`): the shards are disjoint, together they
are the split, and their sizes differ by at most one row. Under data parallelism every rank must take the same number
of steps (each step ends in a gradient all-reduce; a rank with one step more would wait forever), so
:class:`ShardBatches` cuts every rank's shard into the same number of batches: ``ceil(largest shard / local batch)``,
sized as evenly as ``numpy.array_split`` sizes them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from ctrlab.data.batches import FeatureBatch
from ctrlab.errors import RecipeError


def shard_rows(rows: int, rank: int, world_size: int) -> torch.Tensor:
    """The row indices (int64) of a ``rows``-row split that rank ``rank`` of ``world_size`` holds."""
    return torch.arange(rank, rows, world_size, dtype=torch.long)


def shard_sizes(rows: int, world_size: int) -> list[int]:
    """How many rows each rank holds under :func:`shard_rows`."""
    return [len(range(rank, rows, world_size)) for rank in range(world_size)]


class ShardBatches:
    """Mini-batches of one rank's shard, the same number on every rank.

    ``steps`` is ``ceil(largest shard / batch_size)``; the shard (permuted once per epoch with ``shuffle``) is cut
    into that many contiguous, near-equal batches, so no rank's batch is empty as long as every shard holds at least
    ``steps`` rows (:func:`check_shards` refuses smaller ones up front)."""

    def __init__(self, shard: FeatureBatch, split_rows: int, world_size: int, batch_size: int,
                 shuffle: bool = False, generator: torch.Generator | None = None) -> None:
        self.shard = shard
        self.shuffle = shuffle
        self.generator = generator
        self.steps = -(-max(shard_sizes(split_rows, world_size)) // batch_size)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[FeatureBatch]:
        data = self.shard
        if self.shuffle:
            data = data.select(torch.randperm(len(data), generator=self.generator).to(data.categorical.device))
        bounds = np.linspace(0, len(data), self.steps + 1).round().astype(np.int64)
        for start, stop in zip(bounds[:-1], bounds[1:]):
            yield data.select(slice(int(start), int(stop)))


def lockstep(batches: Iterable[FeatureBatch], rows: int, steps: int) -> Iterator[FeatureBatch]:
    """Re-cut a stream of batches holding ``rows`` rows in all into exactly ``steps`` near-equal batches (sizes as
    ``numpy.array_split`` gives them), so that every rank takes the same number of steps whatever its share of a
    streamed split (ranks' shares of whole row groups differ). ``rows`` must be at least ``steps``."""
    if rows < steps:
        raise ValueError(f"{rows} rows cannot fill {steps} non-empty batches")
    sizes = np.diff(np.linspace(0, rows, steps + 1).round().astype(np.int64)).tolist()
    pending: list[FeatureBatch] = []
    held = 0
    for batch in batches:
        pending.append(batch)
        held += len(batch)
        while sizes and held >= sizes[0]:
            whole = FeatureBatch.concat(pending)
            size = sizes.pop(0)
            yield whole.select(slice(0, size))
            rest = whole.select(slice(size, len(whole)))
            pending, held = ([rest] if len(rest) else []), len(rest)
    if sizes or held:
        raise ValueError(f"the stream held other than the {rows} rows it was said to hold")


def check_shards(split: str, sizes: list[int], batch_size: int, key: str = "distributed.processes") -> None:
    """Refuse shares of a split (rows per rank, ``sizes``) too small to give every rank a non-empty batch at every
    step (one line naming ``key``, the setting to change)."""
    world_size = len(sizes)
    steps = -(-max(sizes) // batch_size)
    if min(sizes) < steps or min(sizes) == 0:
        fix = ("lower dataset.chunk_rows (ranks share whole row groups)" if key == "dataset.chunk_rows"
               else "use fewer processes")
        raise RecipeError(f"{key}: {world_size} processes need at least {steps:,} rows each in the {split} split to "
                          f"take a batch at every step; the smallest share has {min(sizes):,} of "
                          f"{sum(sizes):,}; {fix}")
