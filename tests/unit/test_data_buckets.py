"""Aspect-ratio buckets: the bucket set, the nearest bucket, and batches of one bucket each."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from difftrain.api import BucketSpec
from difftrain.data.buckets import BucketBatchSampler, make_buckets, nearest_bucket


def spec(**kw) -> BucketSpec:
    return BucketSpec.model_validate({"enabled": True, **kw})


@settings(max_examples=80, deadline=None)
@given(
    resolution=st.sampled_from([256, 384, 512, 768, 1024]),
    step=st.sampled_from([8, 32, 64, 128]),
    min_size=st.sampled_from([64, 128, 256]),
    max_size=st.sampled_from([512, 1024, 2048]),
)
def test_every_bucket_fits_the_area_the_step_and_the_side_limits(
    resolution, step, min_size, max_size
):
    buckets = make_buckets(spec(step=step, minSize=min_size, maxSize=max_size), resolution)
    assert buckets and len(set(buckets)) == len(buckets)
    for w, h in buckets:
        assert w * h <= resolution * resolution
        assert w % step == 0 and h % step == 0
        assert min_size <= w <= max_size and min_size <= h <= max_size
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)


def test_default_buckets_for_512_are_the_familiar_ones():
    buckets = make_buckets(spec(), 512)
    assert (512, 512) in buckets and (768, 320) in buckets and (320, 768) in buckets
    assert (1024, 256) in buckets and (256, 1024) in buckets
    assert len(buckets) == 13


def test_no_bucket_fits_is_a_clear_error():
    with pytest.raises(ValueError, match=r"minSize 512 squared exceeds the area of resolution 256"):
        make_buckets(spec(minSize=512), 256)


def test_nearest_bucket_is_by_log_aspect_ratio():
    buckets = make_buckets(spec(), 512)
    assert nearest_bucket(1000, 1000, buckets) == (512, 512)
    w, h = nearest_bucket(1920, 1080, buckets)
    best = min(abs(math.log(bw / bh) - math.log(16 / 9)) for bw, bh in buckets)
    assert abs(math.log(w / h) - math.log(16 / 9)) == best
    # symmetric: a tall image goes to the transposed bucket
    assert nearest_bucket(1080, 1920, buckets) == (h, w)


sizes_strategy = st.lists(
    st.sampled_from([(512, 512), (640, 384), (384, 640), (768, 320)]), max_size=120
)


@settings(max_examples=80, deadline=None)
@given(
    sizes=sizes_strategy,
    batch=st.integers(1, 9),
    replicas=st.integers(1, 4),
    seed=st.integers(0, 100),
    epoch=st.integers(0, 3),
)
def test_every_image_is_trained_once_per_epoch_on_any_number_of_ranks(
    sizes, batch, replicas, seed, epoch
):
    per_rank = []
    for rank in range(replicas):
        sampler = BucketBatchSampler(sizes, batch, seed=seed, num_replicas=replicas, rank=rank)
        sampler.set_epoch(epoch)
        per_rank.append(list(sampler))
    # every rank runs the same number of batches (collectives), and len() says how many
    assert {len(b) for b in per_rank} == {len(sampler)}
    seen = sorted(i for batches in per_rank for b in batches for i in b)
    if len(sizes) >= replicas * len(sampler):
        assert seen == list(range(len(sizes)))  # each image exactly once: none left out
    else:  # fewer images than batches to fill: every one trained, fewer than `replicas` twice
        assert set(seen) == set(range(len(sizes)))
        assert len(seen) - len(sizes) < replicas
    for batches in per_rank:
        for b in batches:
            assert len({sizes[i] for i in b}) == 1 and 1 <= len(b) <= batch


def test_a_bucket_smaller_than_a_batch_is_trained():
    # 8 square images and 3 wide ones, batches of 4: the 3 wide ones make a batch of their own
    sizes = [(512, 512)] * 8 + [(640, 384)] * 3
    sampler = BucketBatchSampler(sizes, 4, seed=0)
    batches = list(sampler)
    assert sorted(len(b) for b in batches) == [3, 4, 4]
    assert sorted(i for b in batches for i in b) == list(range(11))
    assert sampler.bucket_counts() == {(512, 512): 8, (640, 384): 3}


def test_batches_are_split_so_ranks_get_equal_counts_without_repeats():
    sizes = [(512, 512)] * 7 + [(640, 384)] * 3
    per_rank = [
        list(BucketBatchSampler(sizes, 2, seed=0, num_replicas=3, rank=r)) for r in range(3)
    ]
    assert [len(b) for b in per_rank] == [2, 2, 2]  # 4 + 2 batches over 3 ranks
    seen = [i for batches in per_rank for b in batches for i in b]
    assert sorted(seen) == list(range(10))
    # 5 batches (4+3 square, 2+1 wide) over 2 ranks: one batch is split, nothing is repeated
    two = [list(BucketBatchSampler(sizes, 4, seed=3, num_replicas=2, rank=r)) for r in range(2)]
    assert [len(b) for b in two] == [2, 2]
    assert sorted(i for batches in two for b in batches for i in b) == list(range(10))


def test_a_position_in_an_epoch_is_the_same_batches_after_a_restart():
    from difftrain.train.batches import data_position

    sizes = [(512, 512)] * 9 + [(640, 384)] * 5 + [(384, 640)]
    first = BucketBatchSampler(sizes, 4, seed=5, num_replicas=2, rank=1)
    run = data_position(first, 0, 0)
    straight = [next(run) for _ in range(7)]
    again = data_position(BucketBatchSampler(sizes, 4, seed=5, num_replicas=2, rank=1), 1, 1)
    assert [next(again) for _ in range(3)] == [s for s in straight if (s[0], s[1]) >= (1, 1)][:3]


def test_order_is_deterministic_per_epoch_and_changes_between_epochs():
    sizes = [(512, 512)] * 40 + [(640, 384)] * 40
    a = BucketBatchSampler(sizes, 4, seed=1)
    b = BucketBatchSampler(sizes, 4, seed=1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(BucketBatchSampler(sizes, 4, seed=2)) != first
