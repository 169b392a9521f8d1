"""Aspect-ratio buckets: train on each image at about its own shape instead of a square crop.

A bucket set covers aspect ratios from tall to wide with sides that are multiples of ``step``
and an area no larger than the target resolution squared (so a batch costs about as much as a
square one); each image goes to the bucket whose aspect ratio is nearest (in log space, so 2:1
and 1:2 are equally far from 1:1), and every batch holds images of one bucket only.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

from difftrain.api import BucketSpec


def make_buckets(spec: BucketSpec, resolution: int) -> list[tuple[int, int]]:
    """The (width, height) buckets for a target area of ``resolution``², sorted by aspect ratio.

    For each width (a multiple of ``step`` within ``[minSize, maxSize]``) the tallest height that
    keeps the area within the target; the square bucket is always included when it fits.
    """
    step = spec.step
    area = resolution * resolution
    lo = math.ceil(spec.min_size / step) * step
    hi = (spec.max_size // step) * step
    buckets: set[tuple[int, int]] = set()
    for width in range(lo, hi + 1, step):
        height = min(hi, (area // width) // step * step)
        if height >= lo:
            buckets.add((width, height))
    square = (resolution // step) * step
    if lo <= square <= hi:
        buckets.add((square, square))
    if not buckets:
        raise ValueError(
            f"no aspect-ratio bucket fits: preprocessing.buckets.minSize {spec.min_size} squared "
            f"exceeds the area of resolution {resolution}; lower minSize or raise the resolution"
        )
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest to ``width / height`` (log-ratio distance; ties go
    to the larger bucket)."""
    if not buckets:
        raise ValueError("nearest_bucket needs at least one bucket")
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


class BucketBatchSampler:
    """A batch sampler whose batches each hold indices of one bucket, every index once an epoch.

    ``sizes[i]`` is the bucket of item ``i`` (from :func:`nearest_bucket`). Each epoch shuffles
    every bucket and the order of the batches, deterministically from ``(seed, epoch)``, so all
    ranks agree on one global list of batches and each takes every ``num_replicas``-th of it.

    Nothing is left out: a bucket's last batch holds what remains (fewer than ``batch_size``
    images, so a bucket smaller than one batch is still trained). Every rank must run the same
    number of batches, so when their count does not divide by ``num_replicas`` the largest
    batches are split in two until it does, which keeps every image to once an epoch; only when
    there are fewer images than batches to fill (a handful of images over many ranks) are some,
    fewer than ``num_replicas``, repeated. The batches of an epoch depend only on the seed, the
    epoch and the sizes, so a position (epoch, batch) is the same after a resume.
    """

    def __init__(
        self,
        sizes: Sequence[tuple[int, int]],
        batch_size: int,
        *,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        groups: dict[tuple[int, int], list[int]] = {}
        for index, (width, height) in enumerate(sizes):
            groups.setdefault((width, height), []).append(index)
        self._buckets = sorted(groups)
        self._groups = [groups[k] for k in self._buckets]

    def set_epoch(self, epoch: int) -> None:
        """Use the shuffle of ``epoch`` (call before iterating, as with DistributedSampler)."""
        self.epoch = epoch

    def bucket_counts(self) -> dict[tuple[int, int], int]:
        """Images per bucket, (width, height) -> count, in the buckets' order."""
        return {b: len(g) for b, g in zip(self._buckets, self._groups, strict=True)}

    def _total_batches(self) -> int:
        batches = sum(-(-len(g) // self.batch_size) for g in self._groups)
        return -(-batches // self.num_replicas) * self.num_replicas

    def __len__(self) -> int:
        """Batches per rank and epoch."""
        return self._total_batches() // self.num_replicas

    def _epoch_batches(self) -> list[list[int]]:
        rng = random.Random(f"difftrain-buckets:{self.seed}:{self.epoch}")
        batches: list[list[int]] = []
        for group in self._groups:
            order = group[:]
            rng.shuffle(order)
            batches.extend(
                order[start : start + self.batch_size]
                for start in range(0, len(order), self.batch_size)
            )
        wanted = self._total_batches()
        while batches and len(batches) < wanted:
            largest = max(range(len(batches)), key=lambda i: len(batches[i]))
            batch = batches[largest]
            if len(batch) < 2:  # fewer images than batches to fill: repeated below
                break
            half = -(-len(batch) // 2)
            batches[largest : largest + 1] = [batch[:half], batch[half:]]
        rng.shuffle(batches)
        if batches and len(batches) < wanted:
            batches = (batches * (wanted // len(batches) + 1))[:wanted]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._epoch_batches()[self.rank :: self.num_replicas]
