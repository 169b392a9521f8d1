"""Several datasets in one epoch, each by its weight (``spec.datasets``).

An epoch is as long as the datasets' images times their repeats, summed (``N``); dataset ``d``
gives ``q_d`` of its examples, ``N * w_d / sum(w)`` rounded by largest remainder (ties to the
earlier dataset) so the quotas sum to ``N``. Of its ``n_d`` examples it gives ``q_d // n_d``
whole passes, each in an order of its own, and ``r = q_d % n_d`` more from a stream that runs on
from epoch to epoch: each pass of it is one order of the examples, ``r`` of them an epoch, the
pass's first ones again filling its last epoch (so none comes twice in an epoch). A dataset
smaller than its share is cycled (every example at least ``q_d // n_d`` times an epoch); a larger
one gives a different part of itself each epoch and all of itself within ``ceil(n_d / r)``
epochs. Every choice is seeded by (seed, dataset, epoch or pass), so an epoch's examples depend
only on the seed, the epoch and the datasets' sizes: a resumed run sees the same.

An example drawn more than once in an epoch gets a copy index of its own (the examples are laid
out ``copies`` times, :meth:`DatasetMix.expand`), so each copy has its own caption, flip and
latent draws, as ``dataset.repeats`` gives. The epoch's indices are batched by a
:class:`difftrain.data.buckets.BucketBatchSampler` over their buckets (each batch from one
bucket, each example keeping its own), seeded by (seed, epoch) as for one dataset.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from difftrain.data.buckets import BucketBatchSampler

T = TypeVar("T")
Size = tuple[int, int]


@dataclass(frozen=True)
class MixPart:
    """One dataset of a mix: the bucket of each of its examples, its weight and repeats."""

    sizes: Sequence[Size]
    weight: float = 1.0
    repeats: int = 1
    name: str = ""  # how messages name it, e.g. "datasets[1] (s3://data/cats)"


def largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` split in proportion to ``weights`` into integers that sum to ``total``."""
    whole = sum(weights)
    exact = [total * w / whole for w in weights]
    out = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


class DatasetMix:
    """Which examples of which dataset an epoch holds; see the module's docstring."""

    def __init__(self, parts: Sequence[MixPart], *, seed: int) -> None:
        if not parts:
            raise ValueError("a mix needs at least one dataset")
        self.parts = list(parts)
        self.seed = seed
        self.counts = [len(p.sizes) for p in parts]
        for part, n in zip(parts, self.counts, strict=True):
            if n == 0:
                raise ValueError(f"{part.name or 'a dataset'}: no example to train on")
        self.epoch_length = sum(n * p.repeats for p, n in zip(parts, self.counts, strict=True))
        self.quotas = largest_remainder(self.epoch_length, [p.weight for p in parts])
        for part, quota in zip(parts, self.quotas, strict=True):
            if quota == 0:
                raise ValueError(
                    f"{part.name or 'a dataset'}: weight {part.weight:g} gives it no example in "
                    f"an epoch of {self.epoch_length}; raise its weight"
                )
        # q // n whole passes and at most once from the running stream: that many copies each
        self.copies = [
            q // n + (1 if q % n else 0) for q, n in zip(self.quotas, self.counts, strict=True)
        ]
        self.offsets: list[int] = []
        at = 0
        for n, k in zip(self.counts, self.copies, strict=True):
            self.offsets.append(at)
            at += n * k
        self.size = at

    def shares(self) -> list[float]:
        """Each dataset's share of an epoch's examples."""
        return [q / self.epoch_length for q in self.quotas]

    def expand(self, examples: Sequence[Sequence[T]]) -> list[T]:
        """The examples laid out as the indices count them: each dataset's, ``copies`` times."""
        if [len(e) for e in examples] != self.counts:
            raise ValueError("expand needs each dataset's examples, as many as its sizes")
        out: list[T] = []
        for part, k in zip(examples, self.copies, strict=True):
            out.extend(list(part) * k)
        return out

    def part_of(self, index: int) -> int:
        """The dataset an index of :meth:`expand`'s list belongs to."""
        if not 0 <= index < self.size:
            raise IndexError(index)
        return bisect.bisect_right(self.offsets, index) - 1

    def _order(self, d: int, kind: str, *number: int) -> list[int]:
        """Dataset ``d``'s positions in an order of their own, seeded by the seed, ``d`` and
        which pass it is (``kind`` and ``number``)."""
        order = list(range(self.counts[d]))
        salt = ":".join(map(str, number))
        random.Random(f"difftrain-mix:{self.seed}:{d}:{kind}:{salt}").shuffle(order)
        return order

    def local_draws(self, d: int, epoch: int) -> list[int]:
        """Dataset ``d``'s examples (its own positions) in ``epoch``, in drawing order."""
        n, q = self.counts[d], self.quotas[d]
        drawn: list[int] = []
        for p in range(q // n):
            drawn.extend(self._order(d, "epoch", epoch, p))
        rest = q % n
        if rest:
            # a pass of the running stream lasts ``m`` epochs: one order of the examples, then
            # its own first ones again to fill the last epoch (never one already in that epoch)
            m = -(-n // rest)
            p, slot = divmod(epoch, m)
            order = self._order(d, "stream", p)
            drawn.extend((order + order[: m * rest - n])[slot * rest : (slot + 1) * rest])
        return drawn

    def epoch(self, epoch: int) -> list[int]:
        """The indices (of :meth:`expand`'s list) of ``epoch``, dataset after dataset."""
        out: list[int] = []
        for d in range(len(self.parts)):
            n, offset = self.counts[d], self.offsets[d]
            seen: dict[int, int] = {}
            for j in self.local_draws(d, epoch):
                copy = seen.get(j, 0)
                seen[j] = copy + 1
                out.append(offset + copy * n + j)
        return out

    def size_of(self, index: int) -> Size:
        """The bucket of an index of :meth:`expand`'s list."""
        d = self.part_of(index)
        return self.parts[d].sizes[(index - self.offsets[d]) % self.counts[d]]


class MixedBatchSampler:
    """Batches of a :class:`DatasetMix`'s epochs: one bucket per batch, every drawn example
    once, split among the ranks: each epoch's draws batched by a
    :class:`difftrain.data.buckets.BucketBatchSampler` over their buckets."""

    def __init__(
        self,
        mix: DatasetMix,
        batch_size: int,
        *,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        self.mix = mix
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._epoch_sampler(0)  # checks batch_size and rank as the bucket sampler does

    def set_epoch(self, epoch: int) -> None:
        """Use the draws of ``epoch`` (call before iterating)."""
        self.epoch = epoch

    def _epoch_sampler(self, epoch: int) -> tuple[list[int], BucketBatchSampler]:
        """The indices ``epoch`` draws and a bucket sampler over their positions."""
        drawn = self.mix.epoch(epoch)
        sampler = BucketBatchSampler(
            [self.mix.size_of(i) for i in drawn],
            self.batch_size,
            seed=self.seed,
            num_replicas=self.num_replicas,
            rank=self.rank,
        )
        sampler.set_epoch(epoch)
        return drawn, sampler

    def bucket_counts(self, epoch: int = 0) -> dict[Size, int]:
        """Examples per bucket in ``epoch``, (width, height) -> count."""
        return self._epoch_sampler(epoch)[1].bucket_counts()

    def batches_in(self, epoch: int) -> int:
        """Batches per rank in ``epoch`` (with buckets it may differ by a few between epochs)."""
        if len({s for p in self.mix.parts for s in p.sizes}) == 1:  # one bucket: every epoch
            epoch = 0
        return len(self._epoch_sampler(epoch)[1])

    def __len__(self) -> int:
        """Batches per rank in the current epoch."""
        return self.batches_in(self.epoch)

    def __iter__(self) -> Iterator[list[int]]:
        drawn, sampler = self._epoch_sampler(self.epoch)
        for batch in sampler:
            yield [drawn[position] for position in batch]
