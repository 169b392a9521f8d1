"""Which process of a job encodes which samples of a latent cache, and the shards that result.

Samples are numbered as the cache stores them: the ``n`` source pairs first, then (with Boomerang)
each source's ``copies`` variants, source by source. Process ``r`` of ``w`` takes a contiguous run
of sources (:func:`source_share`) with their variants, so its samples are at most two runs of
indices. Each run is cut into shards of at most :data:`SHARD_SIZE` samples, and the shards are
numbered in sample order, so a reader that concatenates them in name order reads the samples in
order. One process gives the layout a single-process build has always had.
"""

from __future__ import annotations

from dataclasses import dataclass

SHARD_SIZE = 256


@dataclass(frozen=True)
class PlannedShard:
    """One shard of a cache: its file name, its samples ``start:stop`` and who encodes them."""

    name: str
    start: int
    stop: int
    rank: int

    def __len__(self) -> int:
        return self.stop - self.start


def source_share(n: int, rank: int, world: int) -> range:
    """The sources process ``rank`` of ``world`` encodes: a contiguous run, sizes within one."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not one of {world} processes")
    return range(n * rank // world, n * (rank + 1) // world)


def sample_runs(n: int, copies: int, rank: int, world: int) -> list[range]:
    """The sample indices process ``rank`` encodes: its sources, then those sources' variants."""
    share = source_share(n, rank, world)
    runs = [share, range(n + share.start * copies, n + share.stop * copies)]
    merged: list[range] = []
    for run in runs:
        if not run:
            continue
        if merged and merged[-1].stop == run.start:
            merged[-1] = range(merged[-1].start, run.stop)
        else:
            merged.append(run)
    return merged


def plan_shards(
    n: int, copies: int, world: int, *, shard_size: int = SHARD_SIZE
) -> list[PlannedShard]:
    """Every shard of the cache of ``n`` sources and ``copies`` variants each, built by ``world``
    processes, in sample order."""
    pieces = [
        (start, min(run.stop, start + shard_size), rank)
        for rank in range(world)
        for run in sample_runs(n, copies, rank, world)
        for start in range(run.start, run.stop, shard_size)
    ]
    pieces.sort()
    return [
        PlannedShard(f"shard-{k:05d}.safetensors", start, stop, rank)
        for k, (start, stop, rank) in enumerate(pieces)
    ]
