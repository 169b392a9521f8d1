"""A latent cache built by several processes: each encodes its share of the missing samples, the
index comes last, and the result reads as the cache one process builds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from difftrain.api import DatasetSpec, PreprocessingSpec
from difftrain.data import DatasetError, load_dataset
from difftrain.data.cache import (
    INDEX_FOLDER,
    PARTS_FOLDER,
    SHARDS_FOLDER,
    CacheError,
    LatentCache,
    cache_space,
    new_build_id,
    wanted_samples,
)
from difftrain.data.cache_plan import source_share
from difftrain.data.cache_samples import shard_metadata
from difftrain.data.image_bytes import read_image, with_image_bytes
from difftrain.data.transforms import ImageTransform
from difftrain.models.tiny import build_tiny_components
from difftrain.storage import LocalStore
from tests.datasets import clean_pairs, write_folder_dataset, write_webdataset
from tests.latent_fixtures import make_pairs


@pytest.fixture(scope="module")
def components():
    return build_tiny_components(seed=0)


@given(n=st.integers(0, 700), world=st.integers(1, 9))
def test_every_item_is_in_exactly_one_share_in_order(n, world):
    shares = [source_share(n, r, world) for r in range(world)]
    assert [i for share in shares for i in share] == list(range(n))
    assert max(len(s) for s in shares) - min(len(s) for s in shares) <= 1


# --- building in shares ------------------------------------------------------------------------


def _build_in_shares(cache, pairs, components, transform, world, **kw):
    space = cache_space(transform.pre, components.identity)
    wanted = wanted_samples(pairs, space)
    found = cache.lookup(wanted, flips=space.flips)
    build = new_build_id()
    encoded = [
        cache.build_share(build, pairs, wanted, found, components, transform, rank=r,
                          world=world, **kw)
        for r in range(world)
    ]  # fmt: skip
    cache.commit_shares(build, world=world)
    return encoded


def test_a_cache_built_in_shares_reads_as_one_built_by_one_process(components, tmp_path):
    pairs = make_pairs(7)
    transform = ImageTransform(PreprocessingSpec(resolution=64, flip_probability=0.5))
    space = cache_space(transform.pre, components.identity)
    one = LatentCache(LocalStore(), str(tmp_path / "one"))
    whole, _ = one.get_or_build(pairs, components, transform, space=space, batch_size=2)
    three = LatentCache(LocalStore(), str(tmp_path / "three"))
    assert _build_in_shares(three, pairs, components, transform, 3, batch_size=2) == [2, 2, 3]

    shared = three.lookup(wanted_samples(pairs, space), flips=True, local_dir=tmp_path / "l")
    assert shared.complete
    found = [s for s in shared.samples if s is not None]
    assert [(s.key, s.caption) for s in found] == [(s.key, s.caption) for s in whole]
    for a, b in zip(whole, found, strict=True):
        torch.testing.assert_close(a.latent_params, b.latent_params, rtol=1e-3, atol=1e-3)
        assert a.latent_params_flipped is not None and b.latent_params_flipped is not None
        torch.testing.assert_close(a.latent_params_flipped, b.latent_params_flipped)
        torch.testing.assert_close(a.text_embeddings, b.text_embeddings)
    # each shard says which process encoded it; the parts are gone once indexed
    shards = sorted(Path(three.root, SHARDS_FOLDER).glob("*.safetensors"))
    assert sorted(shard_metadata(p)["rank"] for p in shards) == ["0", "1", "2"]
    assert not any(Path(three.root, PARTS_FOLDER).rglob("*.json"))
    (index,) = Path(three.root, INDEX_FOLDER).glob("*.json")
    assert {e["rank"] for e in json.loads(index.read_text())["shards"].values()} == {0, 1, 2}


def test_no_index_until_every_share_is_there(components, tmp_path):
    pairs = make_pairs(4)
    transform = ImageTransform(PreprocessingSpec(resolution=64))
    cache = LatentCache(LocalStore(), str(tmp_path))
    space = cache_space(transform.pre, components.identity)
    wanted = wanted_samples(pairs, space)
    found = cache.lookup(wanted, flips=False)
    cache.build_share("b1", pairs, wanted, found, components, transform, rank=0, world=2)
    with pytest.raises(CacheError, match="rank 1 uploaded no share"):
        cache.commit_shares("b1", world=2)
    assert not Path(tmp_path, INDEX_FOLDER).exists()
    assert not cache.lookup(wanted, flips=False).complete
    assert Path(tmp_path, PARTS_FOLDER, "b1", "rank-00000.json").exists()


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
    assert len(pairs) == 5 and not any(p.data for p in pairs), "cleaning keeps no bytes"
    expected = [data for data, _ in clean_pairs(5).values()]
    assert [p.data for p in with_image_bytes(pairs[1:4], LocalStore())] == expected[1:4]
    assert [read_image(LocalStore(), p) for p in pairs] == expected
    if layout == "webdataset":  # an uncompressed shard's member is one ranged read
        assert all(p.span is not None for p in pairs)


def test_an_image_changed_since_cleaning_is_an_error(tmp_path):
    uri = write_folder_dataset(tmp_path, clean_pairs(2))
    pairs = _cleaned(uri, cleaning={"minResolution": 8})
    Path(pairs[0].name).write_bytes(Path(pairs[1].name).read_bytes())
    with pytest.raises(DatasetError, match="changed after the dataset was cleaned"):
        with_image_bytes([pairs[0]], LocalStore())
