"""The latent cache on the real MinIO: committed shards, reused by a second run, crash-safe."""

from __future__ import annotations

import pytest
import torch

from difftrain.api import PreprocessingSpec
from difftrain.data.cache import LatentCache, cache_key
from difftrain.data.transforms import ImageTransform
from difftrain.models.tiny import build_tiny_components
from difftrain.storage import MANIFEST_NAME, Credentials, S3Store, StoreConfig, join
from tests.latent_fixtures import make_pairs, spy_on_encoders


@pytest.fixture(scope="module")
def components():
    return build_tiny_components(seed=0)


def store_for(s3) -> S3Store:
    return S3Store(
        StoreConfig(
            endpoint=s3.endpoint,
            credentials=Credentials(s3.access_key, s3.secret_key),
            secure=False,
        )
    )


def test_second_run_on_minio_reuses_the_cache(components, s3, monkeypatch):
    spies = spy_on_encoders(components, monkeypatch)
    spec = PreprocessingSpec(resolution=64, flip_probability=0.5)
    pairs = make_pairs(6)
    key = cache_key(pairs, spec, components.identity)
    root = s3.uri("dataset/.difftrain-cache")

    first, hit = LatentCache(store_for(s3), root).get_or_build(
        key, pairs, components, ImageTransform(spec), batch_size=4
    )
    assert not hit
    calls = spies.calls
    assert calls > 0
    names = sorted(o.object_name for o in s3.client().list_objects(s3.bucket, recursive=True))
    assert names == [
        f"dataset/.difftrain-cache/{key}/{MANIFEST_NAME}",
        f"dataset/.difftrain-cache/{key}/shard-00000.safetensors",
    ]

    # A second run (a new process would build the same store and cache from the spec).
    second, hit = LatentCache(store_for(s3), root).get_or_build(
        key, pairs, components, ImageTransform(spec), batch_size=4
    )
    assert hit and spies.calls == calls
    for a, b in zip(first, second, strict=True):
        assert a.key == b.key and a.caption == b.caption
        assert torch.equal(a.latent_params, b.latent_params)
        assert a.latent_params_flipped is not None and b.latent_params_flipped is not None
        assert torch.equal(a.latent_params_flipped, b.latent_params_flipped)
        assert torch.equal(a.text_embeddings, b.text_embeddings)

    # A new resolution is a new key: encoded again, beside the old cache.
    bigger = PreprocessingSpec(resolution=128, flip_probability=0.5)
    _, hit = LatentCache(store_for(s3), root).get_or_build(
        cache_key(pairs, bigger, components.identity), pairs, components, ImageTransform(bigger)
    )
    assert not hit and spies.calls > calls


def test_cache_without_manifest_on_minio_is_rebuilt(components, s3, monkeypatch):
    store = store_for(s3)
    spec = PreprocessingSpec(resolution=64)
    pairs = make_pairs(3)
    key = cache_key(pairs, spec, components.identity)
    cache = LatentCache(store, s3.uri("ds/.difftrain-cache"))
    cache.build(key, pairs, components, ImageTransform(spec))
    store.delete(join(cache.prefix(key), MANIFEST_NAME))
    assert list(store.list(cache.prefix(key)))  # the shards are still there
    assert cache.lookup(key) is None

    spies = spy_on_encoders(components, monkeypatch)
    samples, hit = cache.get_or_build(key, pairs, components, ImageTransform(spec))
    assert not hit and spies.vae_encode.items == 3 and len(samples) == 3
    assert cache.lookup(key) is not None
