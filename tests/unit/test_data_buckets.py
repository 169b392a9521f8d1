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


@settings(max_examples=60, deadline=None)
@given(
    sizes=sizes_strategy, batch=st.integers(1, 9), seed=st.integers(0, 100), epoch=st.integers(0, 3)
)
def test_every_index_once_per_epoch_in_batches_of_one_bucket(sizes, batch, seed, epoch):
    sampler = BucketBatchSampler(sizes, batch, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(sizes)))
    for b in batches:
        assert len({sizes[i] for i in b}) == 1 and 1 <= len(b) <= batch


@settings(max_examples=60, deadline=None)
@given(
    sizes=sizes_strategy,
    batch=st.integers(1, 9),
    replicas=st.integers(1, 4),
    seed=st.integers(0, 9),
)
def test_ranks_get_disjoint_batches_of_equal_count(sizes, batch, replicas, seed):
    per_rank = [
        list(BucketBatchSampler(sizes, batch, seed=seed, num_replicas=replicas, rank=r))
        for r in range(replicas)
    ]
    counts = {len(b) for b in per_rank}
    assert len(counts) == 1
    assert counts == {len(BucketBatchSampler(sizes, batch, seed=seed, num_replicas=replicas))}
    seen = [i for batches in per_rank for b in batches for i in b]
    assert len(seen) == len(set(seen))
    for batches in per_rank:
        for b in batches:
            assert len(b) == batch and len({sizes[i] for i in b}) == 1


def test_without_drop_last_ranks_still_get_equal_counts():
    sizes = [(512, 512)] * 7 + [(640, 384)] * 3
    per_rank = [
        list(BucketBatchSampler(sizes, 2, seed=0, num_replicas=3, rank=r, drop_last=False))
        for r in range(3)
    ]
    assert [len(b) for b in per_rank] == [2, 2, 2]  # 4 + 2 batches over 3 ranks


def test_order_is_deterministic_per_epoch_and_changes_between_epochs():
    sizes = [(512, 512)] * 40 + [(640, 384)] * 40
    a = BucketBatchSampler(sizes, 4, seed=1)
    b = BucketBatchSampler(sizes, 4, seed=1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(BucketBatchSampler(sizes, 4, seed=2)) != first
