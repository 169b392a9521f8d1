"""The per-sample latent cache on the real MinIO: found without downloading, only new or changed
samples read and encoded, crash-safe, and the same cache from `difftrain dataset cache`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from difftrain.api import BaseModelSpec, DatasetSpec, PreprocessingSpec
from difftrain.cli import main
from difftrain.data.cache import CACHE_FOLDER, INDEX_FOLDER, LatentCache, cache_space
from difftrain.data.transforms import ImageTransform
from difftrain.models import load_base_model
from difftrain.models.tiny import build_tiny_components, build_tiny_pipeline_folder
from difftrain.storage import Credentials, S3Store, StoreConfig, join
from difftrain.train.shared_data import (
    CacheSettings,
    SingleProcess,
    cached_dataset,
    clean_dataset,
)
from tests.latent_fixtures import make_pairs, shape_png, spy_on_encoders
from tests.store_reads import CountsReads


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


class CountingS3Store(CountsReads, S3Store):
    """The real S3 store, counting the GETs of each object on its read path."""


def put(s3, name: str, data: bytes) -> None:
    s3.client().put_object(s3.bucket, name, io.BytesIO(data), len(data))


def prepare(s3, components, tmp_path, name: str):
    """One run's data preparation, as `difftrain run` does it: clean, then find or encode."""
    store = CountingS3Store(store_for(s3).config)
    spec = DatasetSpec(uri=s3.uri("ds"), cleaning={"minResolution": 32, "nearDuplicateDistance": 4})
    root = join(spec.uri, CACHE_FOLDER)
    cleaned = clean_dataset(spec, store, facts_root=root)
    pre = PreprocessingSpec(resolution=64, flip_probability=0.5)
    settings = CacheSettings(
        pre=pre, seed=0, root=root, dtype=torch.float32, generation_dtype=torch.float32
    )
    sizes = [(64, 64)] * len(cleaned.pairs)
    cached = cached_dataset(
        SingleProcess(torch.device("cpu")),
        settings,
        cleaned.pairs,
        sizes,
        components,
        ImageTransform(pre),
        store,
        tmp_path / name,
    )
    return cached, store


def test_adding_one_image_downloads_and_encodes_one(components, s3, tmp_path, monkeypatch):
    spies = spy_on_encoders(components, monkeypatch)
    captions = {}
    for i in range(6):
        data, caption = shape_png(i)
        captions[i] = f"{caption}, picture {i}"  # each caption its own
        put(s3, f"ds/img{i}.png", data)
        put(s3, f"ds/img{i}.txt", captions[i].encode())
    first, cold = prepare(s3, components, tmp_path, "run1")
    assert first.encoded == 6 and not first.hit
    assert len(cold.dataset_reads()) == 12
    assert spies.vae_encode.items == 12  # each image and its mirror image
    calls = spies.calls

    again, warm = prepare(s3, components, tmp_path, "run2")
    assert again.hit and again.encoded == 0 and spies.calls == calls
    assert warm.dataset_reads() == {}, "a cache hit downloads no object of the dataset"

    data, caption = shape_png(6)
    put(s3, "ds/img6.png", data)
    put(s3, "ds/img6.txt", b"a new one, picture 6")
    vae, text = spies.vae_encode.items, spies.text_forward.items
    grown, store = prepare(s3, components, tmp_path, "run3")
    assert grown.encoded == 1 and not grown.hit
    assert spies.vae_encode.items - vae == 2 and spies.text_forward.items - text == 1
    images = {u: n for u, n in store.dataset_reads().items() if u.endswith(".png")}
    assert images == {s3.uri("ds/img6.png"): 2}  # cleaning, then encoding: that image only
    assert store.dataset_reads() == {**images, s3.uri("ds/img6.txt"): 1}
    # training reads bitwise the same tensors for the samples that did not change
    assert [s.key for s in grown.samples] == [f"img{i}" for i in range(7)]
    for a, b in zip(first.samples, grown.samples[:6], strict=True):
        assert torch.equal(a.latent_params, b.latent_params)
        assert a.latent_params_flipped is not None and b.latent_params_flipped is not None
        assert torch.equal(a.latent_params_flipped, b.latent_params_flipped)
        assert torch.equal(a.text_embeddings, b.text_embeddings)

    # a changed caption: that sample's text is encoded again, and no image is read
    put(s3, "ds/img2.txt", b"a rewritten caption for picture 2")
    vae, text = spies.vae_encode.items, spies.text_forward.items
    recaptioned, store = prepare(s3, components, tmp_path, "run4")
    assert recaptioned.encoded == 0 and not recaptioned.hit
    assert spies.vae_encode.items == vae and spies.text_forward.items - text == 1
    assert store.dataset_reads() == {s3.uri("ds/img2.txt"): 1}
    assert recaptioned.samples[2].caption == "a rewritten caption for picture 2"
    assert torch.equal(recaptioned.samples[2].latent_params, first.samples[2].latent_params)


def test_shards_without_an_index_on_minio_are_not_read(components, s3, monkeypatch):
    store = store_for(s3)
    spec = PreprocessingSpec(resolution=64)
    space = cache_space(spec, components.identity)
    pairs = make_pairs(3)
    cache = LatentCache(store, s3.uri("ds/.difftrain-cache"))
    cache.get_or_build(pairs, components, ImageTransform(spec), space=space)
    for uri in store.list(join(cache.root, INDEX_FOLDER) + "/"):
        store.delete(uri)  # as if the run had stopped between its shards and its index
    assert list(store.list(cache.root + "/"))  # the shards are still there
    spies = spy_on_encoders(components, monkeypatch)
    samples, encoded = cache.get_or_build(pairs, components, ImageTransform(spec), space=space)
    assert encoded == 3 and spies.vae_encode.items == 3 and len(samples) == 3


def test_dataset_cache_command_on_minio(s3, tmp_path, monkeypatch, capsys):
    for i in range(3):
        data, caption = shape_png(i)
        put(s3, f"ds/img{i}.png", data)
        put(s3, f"ds/img{i}.txt", caption.encode())
    model = build_tiny_pipeline_folder(tmp_path / "model")
    monkeypatch.setenv("DIFFTRAIN_STORE_ACCESS_KEY", s3.access_key)
    monkeypatch.setenv("DIFFTRAIN_STORE_SECRET_KEY", s3.secret_key)
    args = ["dataset", "cache", s3.uri("ds"), "--model", str(model), "--endpoint", s3.endpoint]
    args += ["--insecure", "--resolution", "64", "--min-resolution", "32"]
    args += ["--near-duplicate-distance", "0", "--dtype", "fp32", "--json"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["hit"] is False and first["samples"] == 3 and first["encoded"] == 3
    assert first["uri"] == s3.uri("ds/.difftrain-cache")
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["hit"] is True and second["key"] == first["key"]

    # A training run's preparation finds every sample: same images, settings and model.
    loaded = load_base_model(BaseModelSpec(uri=str(model)), None, work_dir=tmp_path / "w")
    store = CountingS3Store(store_for(s3).config)
    spec = DatasetSpec(uri=s3.uri("ds"), cleaning={"minResolution": 32, "nearDuplicateDistance": 0})
    cleaned = clean_dataset(spec, store, facts_root=s3.uri("ds/.difftrain-cache"))
    pre = PreprocessingSpec(resolution=64)
    settings = CacheSettings(
        pre=pre, seed=0, root=s3.uri("ds/.difftrain-cache"), dtype=torch.float32,
        generation_dtype=torch.float32,
    )  # fmt: skip
    cached = cached_dataset(
        SingleProcess(torch.device("cpu")), settings, cleaned.pairs, [(64, 64)] * 3, loaded,
        ImageTransform(pre), store, Path(tmp_path / "local"),
    )  # fmt: skip
    assert cached.hit and cached.key == first["key"]
    assert store.dataset_reads() == {}
