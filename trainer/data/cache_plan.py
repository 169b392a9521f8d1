"""Which process of a job encodes which of the samples a latent cache is missing.

The missing samples are grouped by the image they come from (a source and its Boomerang
variants); process ``r`` of ``w`` takes a contiguous run of those sources (:func:`source_share`),
and a contiguous run of the missing captions. One process takes everything.
"""

from __future__ import annotations

SHARD_SIZE = 256  # samples (or captions) per shard
CHUNK_SOURCES = 32  # images read, augmented and encoded together, then let go


def source_share(n: int, rank: int, world: int) -> range:
    """The items process ``rank`` of ``world`` takes of ``n``: a contiguous run, sizes within
    one of each other."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not one of {world} processes")
    return range(n * rank // world, n * (rank + 1) // world)
