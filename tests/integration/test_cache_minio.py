"""The latent cache on the real MinIO: committed shards, reused by a second run, crash-safe."""

from __future__ import annotations

import io
import json

import pytest
import torch

from difftrain.api import BaseModelSpec, DatasetSpec, PreprocessingSpec
from difftrain.cli import main
from difftrain.data.cache import LatentCache, cache_key
from difftrain.data.cleaning import load_dataset
from difftrain.data.transforms import ImageTransform
from difftrain.models import load_base_model
from difftrain.models.tiny import build_tiny_components, build_tiny_pipeline_folder
from difftrain.storage import MANIFEST_NAME, Credentials, S3Store, StoreConfig, join
from tests.latent_fixtures import make_pairs, shape_png, spy_on_encoders


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


def test_dataset_cache_command_on_minio(s3, tmp_path, monkeypatch, capsys):
    mc = s3.client()
    for i in range(3):
        data, caption = shape_png(i)
        mc.put_object(s3.bucket, f"ds/img{i}.png", io.BytesIO(data), len(data))
        text = caption.encode()
        mc.put_object(s3.bucket, f"ds/img{i}.txt", io.BytesIO(text), len(text))
    model = build_tiny_pipeline_folder(tmp_path / "model")
    monkeypatch.setenv("DIFFTRAIN_STORE_ACCESS_KEY", s3.access_key)
    monkeypatch.setenv("DIFFTRAIN_STORE_SECRET_KEY", s3.secret_key)
    args = [
        "dataset",
        "cache",
        s3.uri("ds"),
        "--model",
        str(model),
        "--endpoint",
        s3.endpoint,
        "--insecure",
        "--resolution",
        "64",
        "--min-resolution",
        "32",
        "--near-duplicate-distance",
        "0",
        "--json",
    ]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["hit"] is False and first["samples"] == 3
    assert first["uri"] == s3.uri(f"ds/.difftrain-cache/{first['key']}")
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["hit"] is True and second["key"] == first["key"]

    # A training run's lookup finds the same cache: same pairs, settings and model, same key.

    store = store_for(s3)
    loaded = load_base_model(BaseModelSpec(uri=str(model)), None, work_dir=tmp_path / "w")
    cleaned = load_dataset(
        DatasetSpec(uri=s3.uri("ds"), cleaning={"minResolution": 32, "nearDuplicateDistance": 0}),
        store,
    )
    key = cache_key(cleaned.pairs, PreprocessingSpec(resolution=64), loaded.identity)
    assert key == first["key"]
    assert LatentCache(store, s3.uri("ds/.difftrain-cache")).lookup(key) is not None
