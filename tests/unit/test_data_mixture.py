"""Several datasets in one epoch by their weights (difftrain.data.mixture): the shares, the
cycling of a small dataset, the parts of a large one, buckets, determinism and resume."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from difftrain.data.mixture import DatasetMix, MixedBatchSampler, MixPart, largest_remainder
from difftrain.train.batches import data_position, epoch_batches

BUCKETS = [(64, 64), (96, 48), (48, 96)]

parts_strategy = st.lists(
    st.tuples(
        st.integers(min_value=1, max_value=30),  # examples
        st.floats(min_value=0.1, max_value=10.0, allow_nan=False),  # weight
        st.integers(min_value=1, max_value=3),  # repeats
        st.integers(min_value=0, max_value=10_000),  # the buckets' draw
    ),
    min_size=1,
    max_size=4,
)


def _mix(parts: list[tuple[int, float, int, int]], seed: int) -> DatasetMix:
    """The mix of generated datasets; one whose weight gives it no example (refused, see the
    test of that) is not generated."""
    epoch = sum(n * r for n, _, r, _ in parts)
    assume(all(epoch * w / sum(p[1] for p in parts) >= 1 for _, w, _, _ in parts))
    return DatasetMix(
        [
            MixPart(sizes=[BUCKETS[(b + i * 7) % 3] for i in range(n)], weight=w, repeats=r)
            for n, w, r, b in parts
        ],
        seed=seed,
    )


def _per_dataset(mix: DatasetMix, indices: list[int]) -> Counter[int]:
    return Counter(mix.part_of(i) for i in indices)


def _local(mix: DatasetMix, index: int) -> tuple[int, int]:
    d = mix.part_of(index)
    return d, (index - mix.offsets[d]) % mix.counts[d]


@settings(max_examples=80, deadline=None)
@given(parts=parts_strategy, seed=st.integers(0, 2**31), epoch=st.integers(0, 50))
def test_an_epoch_follows_the_weights_and_cycles_small_datasets(parts, seed, epoch):
    """The epoch is the datasets' images x repeats summed; each dataset gives its weight's share
    of it within rounding (less than one example off); a dataset whose share is at least its size
    shows every example, each at least share // size times; the same seed and epoch give the same
    examples in the same order."""
    mix = _mix(parts, seed)
    indices = mix.epoch(epoch)
    assert len(indices) == mix.epoch_length == sum(n * r for n, _, r, _ in parts)
    total_weight = sum(w for _, w, _, _ in parts)
    counts = _per_dataset(mix, indices)
    for d, (n, w, _, _) in enumerate(parts):
        assert abs(counts[d] - mix.epoch_length * w / total_weight) < 1
        shown = Counter(j for dd, j in map(lambda i: _local(mix, i), indices) if dd == d)
        if counts[d] >= n:
            assert set(shown) == set(range(n))
            assert min(shown.values()) >= counts[d] // n
        else:  # fewer than its size: each at most once
            assert max(shown.values()) == 1
    # every copy of an example is an index of its own, inside the laid-out examples
    assert len(set(indices)) == len(indices)
    assert all(0 <= i < mix.size for i in indices)
    assert _mix(parts, seed).epoch(epoch) == indices


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(min_value=5, max_value=40),
    share=st.integers(min_value=1, max_value=39),
    seed=st.integers(0, 2**31),
)
def test_a_large_dataset_gives_a_different_part_each_epoch_and_all_of_itself_in_turn(
    n, share, seed
):
    """A dataset whose share is under its size gives, over consecutive epochs, every example
    once before any comes again."""
    share = min(share, n - 1)
    # an epoch of 2n (two datasets of n): weights share and 2n - share give dataset 0 `share`
    mix = DatasetMix(
        [MixPart([(64, 64)] * n, weight=share), MixPart([(64, 64)] * n, weight=2 * n - share)],
        seed=seed,
    )
    assert mix.quotas[0] == share
    epochs = -(-n // share)
    drawn = [j for e in range(epochs + 1) for j in mix.local_draws(0, e)]
    assert sorted(drawn[:n]) == list(range(n))
    assert set(mix.local_draws(0, 0)).isdisjoint(mix.local_draws(0, 1)) or 2 * share > n


def test_shares_are_rounded_to_the_epoch_by_largest_remainder():
    assert largest_remainder(10, [1, 1, 1]) == [4, 3, 3]
    assert largest_remainder(12, [3, 1]) == [9, 3]
    assert sum(largest_remainder(1001, [0.3, 2.7, 1.1])) == 1001


def test_a_weight_too_small_for_one_example_is_refused_naming_the_dataset():
    with pytest.raises(ValueError, match=r"datasets\[1\] .*weight 0.001 gives it no example"):
        DatasetMix(
            [
                MixPart([(64, 64)] * 10, weight=1),
                MixPart([(64, 64)] * 2, weight=0.001, name="datasets[1] (/data/b)"),
            ],
            seed=0,
        )


def test_each_copy_has_its_own_example_and_keeps_its_bucket():
    """3 examples with weight 3 and 9 with weight 1: 9 + 3 of an epoch of 12, the small dataset
    three times over, each copy its own index laid out by expand; every batch is one bucket."""
    small = [(64, 64), (96, 48), (64, 64)]
    big = [BUCKETS[i % 3] for i in range(9)]
    mix = DatasetMix([MixPart(small, weight=3), MixPart(big, weight=1)], seed=5)
    assert mix.quotas == [9, 3] and mix.shares() == [0.75, 0.25]
    names = [f"s{i}" for i in range(3)], [f"b{i}" for i in range(9)]
    laid = mix.expand(names)
    assert len(laid) == mix.size
    indices = mix.epoch(0)
    assert Counter(laid[i] for i in indices if mix.part_of(i) == 0) == {"s0": 3, "s1": 3, "s2": 3}
    sizes = {**dict(zip(names[0], small, strict=True)), **dict(zip(names[1], big, strict=True))}
    assert all(mix.size_of(i) == sizes[laid[i]] for i in indices)
    sampler = MixedBatchSampler(mix, 2, seed=5)
    batches = epoch_batches(sampler, 0)
    assert sorted(i for b in batches for i in b) == sorted(indices)
    assert all(len({mix.size_of(i) for i in b}) == 1 for b in batches)
    assert len(sampler) == len(batches)


@settings(max_examples=40, deadline=None)
@given(
    parts=parts_strategy,
    seed=st.integers(0, 2**31),
    batch_size=st.integers(1, 4),
    world=st.integers(1, 3),
    stop=st.integers(0, 40),
)
def test_resume_from_a_position_gives_the_straight_runs_batches(
    parts, seed, batch_size, world, stop
):
    """What a run sees from a checkpoint's (epoch, batch) on is what the uninterrupted run saw
    from there, on every rank; all ranks run as many batches an epoch."""
    mix = _mix(parts, seed)
    for rank in range(world):
        straight = data_position(
            MixedBatchSampler(mix, batch_size, seed=seed, num_replicas=world, rank=rank), 0, 0
        )
        seen = [next(straight) for _ in range(stop + 10)]
        epoch, index, _ = seen[stop]
        again = _mix(parts, seed)  # a new process: nothing carried over but the position
        resumed = data_position(
            MixedBatchSampler(again, batch_size, seed=seed, num_replicas=world, rank=rank),
            epoch,
            index,
        )
        assert [next(resumed) for _ in range(10)] == seen[stop : stop + 10]
    lengths = {
        MixedBatchSampler(mix, batch_size, seed=seed, num_replicas=world, rank=r).batches_in(3)
        for r in range(world)
    }
    assert len(lengths) == 1


def test_another_seed_draws_another_epoch():
    parts = [MixPart([(64, 64)] * 7, weight=2), MixPart([(64, 64)] * 20, weight=1)]
    assert DatasetMix(parts, seed=1).epoch(0) != DatasetMix(parts, seed=2).epoch(0)
    assert DatasetMix(parts, seed=1).epoch(0) != DatasetMix(parts, seed=1).epoch(1)
