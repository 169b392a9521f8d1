"""A latent cache built by several processes: each encodes its share, the manifest comes last, and
the result reads as the cache one process builds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from difftrain.api import DatasetSpec, PreprocessingSpec
from difftrain.data import DatasetError, load_dataset
from difftrain.data.cache import PARTS_FOLDER, CacheError, LatentCache
from difftrain.data.cache_plan import SHARD_SIZE, plan_shards, sample_runs, source_share
from difftrain.data.image_bytes import with_image_bytes
from difftrain.data.transforms import ImageTransform
from difftrain.models.tiny import build_tiny_components
from difftrain.storage import MANIFEST_NAME, LocalStore, join, read_manifest
from tests.datasets import clean_pairs, write_folder_dataset, write_webdataset
from tests.latent_fixtures import make_pairs


@pytest.fixture(scope="module")
def components():
    return build_tiny_components(seed=0)


# --- the plan ----------------------------------------------------------------------------------


def test_one_process_plans_the_single_process_layout():
    plan = plan_shards(600, 2, 1)
    assert [(s.name, s.start, s.stop) for s in plan] == [
        (f"shard-{k:05d}.safetensors", start, min(1800, start + SHARD_SIZE))
        for k, start in enumerate(range(0, 1800, SHARD_SIZE))
    ]
    assert {s.rank for s in plan} == {0}


def test_each_process_encodes_its_sources_and_their_variants():
    # 5 sources, 2 copies, 2 processes: rank 0 has sources 0-1 (variants 5-8), rank 1 has 2-4
    assert sample_runs(5, 2, 0, 2) == [range(0, 2), range(5, 9)]
    assert sample_runs(5, 2, 1, 2) == [range(2, 5), range(9, 15)]
    plan = plan_shards(5, 2, 2)
    assert [(s.start, s.stop, s.rank) for s in plan] == [
        (0, 2, 0),
        (2, 5, 1),
        (5, 9, 0),
        (9, 15, 1),
    ]


@given(
    n=st.integers(0, 700),
    copies=st.integers(0, 3),
    world=st.integers(1, 9),
    shard_size=st.integers(1, 300),
)
def test_every_sample_is_in_exactly_one_shard_in_order(n, copies, world, shard_size):
    plan = plan_shards(n, copies, world, shard_size=shard_size)
    covered = [i for s in plan for i in range(s.start, s.stop)]
    assert covered == list(range(n * (1 + copies)))
    assert [s.name for s in plan] == sorted(s.name for s in plan)
    assert all(0 < len(s) <= shard_size for s in plan)
    shares = [len(source_share(n, r, world)) for r in range(world)]
    assert sum(shares) == n and max(shares) - min(shares) <= 1
    for rank in range(world):
        mine = [i for s in plan if s.rank == rank for i in range(s.start, s.stop)]
        assert mine == [i for run in sample_runs(n, copies, rank, world) for i in run]


# --- building in shares ------------------------------------------------------------------------


def _build_in_shares(cache, key, pairs, components, transform, world, **kw):
    plan = plan_shards(len(pairs), 0, world)
    for rank in range(world):
        share = source_share(len(pairs), rank, world)
        cache.build_share(
            key, pairs[share.start : share.stop], components, transform, plan=plan, rank=rank, **kw
        )
    cache.commit_shares(key, plan, world=world, flips=transform.pre.flip_probability > 0)
    return plan


def test_a_cache_built_in_shares_reads_as_one_built_by_one_process(components, tmp_path):
    pairs = make_pairs(7)
    transform = ImageTransform(PreprocessingSpec(resolution=64, flip_probability=0.5))
    cache = LatentCache(LocalStore(), str(tmp_path))
    whole = cache.build("one", pairs, components, transform, batch_size=2)
    _build_in_shares(cache, "three", pairs, components, transform, 3, batch_size=2)

    shared = cache.lookup("three", local_dir=tmp_path / "local")
    assert shared is not None
    assert [(s.key, s.caption) for s in shared] == [(s.key, s.caption) for s in whole]
    for a, b in zip(whole, shared, strict=True):
        torch.testing.assert_close(a.latent_params, b.latent_params, rtol=1e-3, atol=1e-3)
        assert a.latent_params_flipped is not None and b.latent_params_flipped is not None
        torch.testing.assert_close(a.latent_params_flipped, b.latent_params_flipped)
        torch.testing.assert_close(a.text_embeddings, b.text_embeddings)
    manifest = read_manifest(LocalStore(), cache.prefix("three"))
    assert manifest is not None
    assert manifest["metadata"]["samples"] == 7 and manifest["metadata"]["processes"] == 3
    # each shard says which process encoded it
    ranks = []
    for entry in manifest["files"]:
        with open(join(cache.prefix("three"), entry["name"]), "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        ranks.append(header["__metadata__"]["rank"])
    assert ranks == ["0", "1", "2"]


def test_no_manifest_until_every_share_is_there(components, tmp_path):
    pairs = make_pairs(4)
    transform = ImageTransform(PreprocessingSpec(resolution=64))
    cache = LatentCache(LocalStore(), str(tmp_path))
    plan = plan_shards(4, 0, 2)
    cache.build_share("k", pairs[:2], components, transform, plan=plan, rank=0)
    with pytest.raises(CacheError, match="rank 1 uploaded no share"):
        cache.commit_shares("k", plan, world=2, flips=False)
    assert not Path(cache.prefix("k"), MANIFEST_NAME).exists()
    assert cache.lookup("k") is None
    assert Path(cache.prefix("k"), PARTS_FOLDER, "rank-00000.json").exists()


def test_a_share_of_the_wrong_size_is_refused(components, tmp_path):
    cache = LatentCache(LocalStore(), str(tmp_path))
    plan = plan_shards(4, 0, 2)
    with pytest.raises(CacheError, match="rank 1 was given 1 samples for shards of 2"):
        cache.build_share(
            "k", make_pairs(1), components, ImageTransform(PreprocessingSpec()), plan=plan, rank=1
        )


# --- a process's share of the images, read again -----------------------------------------------


def _cleaned(uri: str, **spec):
    result = load_dataset(DatasetSpec.model_validate({"uri": uri, **spec}), LocalStore())
    return result.pairs


@pytest.mark.parametrize("layout", ["folder", "webdataset"])
def test_pairs_without_bytes_get_theirs_back_from_the_dataset(tmp_path, layout):
    if layout == "folder":
        uri = write_folder_dataset(tmp_path, clean_pairs(5))
    else:
        uri = write_webdataset(tmp_path, clean_pairs(5), shard_size=2)
    pairs = _cleaned(uri, cleaning={"minResolution": 8})
    assert len(pairs) == 5
    bare = [dataclasses.replace(p, data=b"") for p in pairs]
    assert with_image_bytes(bare[1:4], LocalStore()) == pairs[1:4]


def test_an_image_changed_since_cleaning_is_an_error(tmp_path):
    uri = write_folder_dataset(tmp_path, clean_pairs(2))
    pairs = _cleaned(uri, cleaning={"minResolution": 8})
    Path(pairs[0].name).write_bytes(Path(pairs[1].name).read_bytes())
    with pytest.raises(DatasetError, match="changed after the dataset was cleaned"):
        with_image_bytes([dataclasses.replace(pairs[0], data=b"")], LocalStore())
