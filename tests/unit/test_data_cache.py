"""The per-sample latent/text-embedding cache: each image and caption encoded once, found again
by its content, and only what is new or changed encoded in a later run."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difftrain.api import PreprocessingSpec
from difftrain.data.cache import (
    INDEX_FOLDER,
    SHARDS_FOLDER,
    CachedSample,
    CacheError,
    LatentCache,
    cache_space,
    sample_rng,
    wanted_samples,
)
from difftrain.data.images import decode_rgb
from difftrain.data.transforms import ImageTransform
from difftrain.models.tiny import build_tiny_components
from difftrain.storage import LocalStore
from tests.latent_fixtures import make_pairs, spy_on_encoders


@pytest.fixture(scope="module")
def components():
    return build_tiny_components(seed=0)


def pre(**kw) -> PreprocessingSpec:
    return PreprocessingSpec(resolution=64, **kw)


def build(cache, pairs, components, spec=None, **kw):
    spec = spec or pre()
    space = cache_space(spec, components.identity, seed=kw.pop("seed", 0))
    return cache.get_or_build(pairs, components, ImageTransform(spec), space=space, **kw)


def test_second_run_hits_the_cache_without_calling_the_encoders(components, tmp_path, monkeypatch):
    spies = spy_on_encoders(components, monkeypatch)
    pairs = make_pairs(5)
    cache = LatentCache(LocalStore(), str(tmp_path / ".difftrain-cache"))

    first, encoded = build(cache, pairs, components, batch_size=2)
    assert encoded == 5
    # each caption is encoded once, however many images share it
    assert spies.vae_encode.items == 5
    assert spies.text_forward.items == len({p.caption for p in pairs}) < 5
    calls = spies.calls

    second, encoded = build(cache, pairs, components, batch_size=2)
    assert encoded == 0
    assert spies.calls == calls, "a cache hit must not run the VAE or the text encoder"
    assert [s.key for s in second] == [p.key for p in pairs]
    assert [s.caption for s in second] == [p.caption for p in pairs]
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.latent_params, b.latent_params)
        assert torch.equal(a.text_embeddings, b.text_embeddings)
        assert a.latent_params.dtype == torch.float16


def test_one_new_image_encodes_one(components, tmp_path, monkeypatch):
    spies = spy_on_encoders(components, monkeypatch)
    pairs = make_pairs(6)
    pairs[5] = dataclasses.replace(pairs[5], caption="a caption of its own")
    cache = LatentCache(LocalStore(), str(tmp_path))
    first, _ = build(cache, pairs[:5], components)
    vae, text = spies.vae_encode.items, spies.text_forward.items
    second, encoded = build(cache, pairs, components)
    assert encoded == 1
    assert spies.vae_encode.items - vae == 1 and spies.text_forward.items - text == 1
    for a, b in zip(first, second[:5], strict=True):
        assert torch.equal(a.latent_params, b.latent_params)
        assert torch.equal(a.text_embeddings, b.text_embeddings)
    # the new sample went into a shard of its own, beside the first build's, under a new index
    assert len(list(Path(tmp_path, SHARDS_FOLDER).glob("*.safetensors"))) == 2
    assert len(list(Path(tmp_path, INDEX_FOLDER).glob("*.json"))) == 2


def test_a_changed_caption_re_encodes_only_its_text(components, tmp_path, monkeypatch):
    spies = spy_on_encoders(components, monkeypatch)
    pairs = make_pairs(3)
    cache = LatentCache(LocalStore(), str(tmp_path))
    first, _ = build(cache, pairs, components)
    vae, text = spies.vae_encode.items, spies.text_forward.items
    edited = [pairs[0], dataclasses.replace(pairs[1], caption="a green star"), pairs[2]]
    second, encoded = build(cache, edited, components)
    assert encoded == 0, "the image did not change: no latent is encoded"
    assert spies.vae_encode.items == vae and spies.text_forward.items - text == 1
    assert second[1].caption == "a green star"
    assert torch.equal(first[1].latent_params, second[1].latent_params)
    assert not torch.equal(first[1].text_embeddings, second[1].text_embeddings)
    assert torch.equal(first[0].text_embeddings, second[0].text_embeddings)


def test_latents_without_text_embeddings(components, tmp_path, monkeypatch):
    """For captions that change from epoch to epoch: the loop encodes the text itself."""
    spies = spy_on_encoders(components, monkeypatch)
    cache = LatentCache(LocalStore(), str(tmp_path))
    samples, encoded = build(cache, make_pairs(2), components, texts=False)
    assert encoded == 2 and spies.text_forward.items == 0
    assert all(s.text_embeddings is None for s in samples)
    assert samples[0].latent_params.shape == (8, 32, 32)


def test_resolution_change_rebuilds_with_the_new_shape(components, tmp_path, monkeypatch):
    spies = spy_on_encoders(components, monkeypatch)
    pairs = make_pairs(2, sizes=[(128, 128), (128, 128)])
    cache = LatentCache(LocalStore(), str(tmp_path))
    samples, _ = build(cache, pairs, components)
    texts = spies.text_forward.items
    rebuilt, encoded = build(cache, pairs, components, PreprocessingSpec(resolution=128))
    assert encoded == 2
    assert spies.text_forward.items == texts, "the captions' embeddings do not depend on it"
    # The tiny VAE downsamples twice: 64 px -> 32, 128 px -> 64; 4 channels -> 8 parameters.
    assert samples[0].latent_params.shape == (8, 32, 32)
    assert rebuilt[0].latent_params.shape == (8, 64, 64)


def _addresses(pairs, spec, model, seed=0):
    return [(w.latent, w.text) for w in wanted_samples(pairs, cache_space(spec, model, seed=seed))]


def test_addresses_change_with_caption_model_and_settings():
    pairs = make_pairs(3)
    base = _addresses(pairs, pre(), "model-a")
    assert base == _addresses(make_pairs(3), pre(), "model-a"), "same inputs, same addresses"
    recaptioned = [*pairs[:2], dataclasses.replace(pairs[2], caption="a new caption")]
    edited = _addresses(recaptioned, pre(), "model-a")
    assert edited[:2] == base[:2]
    assert edited[2][0] == base[2][0] and edited[2][1] != base[2][1], "only its text changes"
    latents = {
        "model": _addresses(pairs, pre(), "model-b"),
        "resolution": _addresses(pairs, PreprocessingSpec(resolution=128), "model-a"),
        "crop": _addresses(pairs, pre(crop="random"), "model-a"),
        "rotation": _addresses(pairs, pre(max_rotation_degrees=5), "model-a"),
        "flips": _addresses(pairs, pre(flip_probability=0.5), "model-a"),
        "buckets": _addresses(pairs, pre(buckets={"enabled": True}), "model-a"),
        "boomerang": _addresses(pairs, pre(boomerang={"enabled": True}), "model-a")[:3],
    }
    firsts = [a[0][0] for a in latents.values()]
    assert base[0][0] not in firsts and len(set(firsts)) == len(firsts)
    assert latents["model"][0][1] != base[0][1], "another text encoder, another text address"
    assert latents["resolution"][0][1] == base[0][1]
    # How often flips are used does not change the tensors.
    assert _addresses(pairs, pre(flip_probability=0.5), "m") == _addresses(
        pairs, pre(flip_probability=0.9), "m"
    )


@pytest.mark.parametrize(
    "settings_of",
    [{"crop": "random"}, {"max_rotation_degrees": 5}, {"boomerang": {"enabled": True}}],
)
def test_the_seed_and_key_count_where_they_change_the_tensors(settings_of):
    """Random crops, rotations and Boomerang variants depend on the seed and key; centre crops
    do not, so a renamed copy of an image is found again."""
    pairs = make_pairs(3)
    seeded = pre(**settings_of)
    assert _addresses(pairs, seeded, "m", seed=1) != _addresses(pairs, seeded, "m", seed=2)
    assert _addresses(pairs, pre(), "m", seed=1) == _addresses(pairs, pre(), "m", seed=2)
    renamed = [dataclasses.replace(p, key=p.key + "-copy") for p in pairs]
    assert _addresses(renamed, pre(), "m") == _addresses(pairs, pre(), "m")
    assert _addresses(renamed, seeded, "m") != _addresses(pairs, seeded, "m")


@settings(max_examples=50, deadline=None)
@given(index=st.integers(0, 2), caption=st.text(max_size=40), content=st.binary(max_size=16))
def test_a_change_of_one_pair_changes_only_its_addresses(index, caption, content):
    pairs = make_pairs(3)
    base = _addresses(pairs, pre(), "m")
    edited = list(pairs)
    edited[index] = dataclasses.replace(pairs[index], caption=caption, sha256=content.hex())
    after = _addresses(edited, pre(), "m")
    assert [a for i, a in enumerate(after) if i != index] == [
        a for i, a in enumerate(base) if i != index
    ]
    assert (after[index][0] == base[index][0]) == (content.hex() == pairs[index].sha256)
    assert (after[index][1] == base[index][1]) == (caption == pairs[index].caption)


def test_model_change_rebuilds(components, tmp_path, monkeypatch):
    other = build_tiny_components(seed=1)
    assert other.identity != components.identity
    pairs = make_pairs(2)
    cache = LatentCache(LocalStore(), str(tmp_path))
    build(cache, pairs, components)
    spies = spy_on_encoders(other, monkeypatch)
    samples, encoded = build(cache, pairs, other)
    assert encoded == 2 and spies.vae_encode.items == 2
    transform = ImageTransform(pre())
    expected = _encode_mean(other, transform, pairs[0])
    torch.testing.assert_close(_mean(samples[0]), expected, atol=2e-2, rtol=2e-2)


def test_shards_without_an_index_are_not_read(components, tmp_path, monkeypatch):
    pairs = make_pairs(3)
    cache = LatentCache(LocalStore(), str(tmp_path))
    build(cache, pairs, components)
    # A crash between the shards and the index leaves the shards without any index naming them.
    for index in Path(tmp_path, INDEX_FOLDER).glob("*.json"):
        index.unlink()
    assert any(Path(tmp_path, SHARDS_FOLDER).glob("*.safetensors"))
    spies = spy_on_encoders(components, monkeypatch)
    samples, encoded = build(cache, pairs, components)
    assert encoded == 3 and spies.vae_encode.items == 3 and len(samples) == 3
    assert build(cache, pairs, components)[1] == 0


def test_a_damaged_shard_is_not_trusted_and_its_samples_are_encoded_again(
    components, tmp_path, monkeypatch
):
    pairs = make_pairs(4)
    cache = LatentCache(LocalStore(), str(tmp_path))
    build(cache, pairs[:2], components)
    build(cache, pairs, components)  # samples 2-3 in a second shard
    shards = Path(tmp_path, SHARDS_FOLDER).glob("*.safetensors")
    second = max(shards, key=lambda p: p.stat().st_mtime_ns)
    data = bytearray(second.read_bytes())
    data[-1] ^= 0xFF
    second.write_bytes(bytes(data))
    spies = spy_on_encoders(components, monkeypatch)
    samples, encoded = build(cache, pairs, components)
    assert encoded == 2 and spies.vae_encode.items == 2 and len(samples) == 4


def _encode_mean(components, transform, pair, *, flip=False, seed=0) -> torch.Tensor:
    image = decode_rgb(pair.data, pair.name)
    pixels = transform(image, size=None, rng=sample_rng(seed, pair.key), flip=flip)
    with torch.no_grad():
        mean: torch.Tensor = components.vae.encode(pixels.unsqueeze(0)).latent_dist.mean[0]
    return mean


def _mean(sample: CachedSample, flipped: bool = False) -> torch.Tensor:
    params = sample.latent_params_flipped if flipped else sample.latent_params
    assert params is not None
    return params.float().chunk(2, dim=0)[0]


def test_cached_mean_is_the_vae_encoding_of_the_transformed_image(components, tmp_path):
    pairs = make_pairs(3)
    transform = ImageTransform(pre())
    exact, _ = build(LatentCache(LocalStore(), str(tmp_path / "a")), pairs, components,
                     dtype=torch.float32, batch_size=2)  # fmt: skip
    half, _ = build(LatentCache(LocalStore(), str(tmp_path / "b")), pairs, components, batch_size=2)
    for pair, s32, s16 in zip(pairs, exact, half, strict=True):
        expected = _encode_mean(components, transform, pair)
        torch.testing.assert_close(_mean(s32), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_mean(s16), expected, atol=2e-2, rtol=2e-2)
        assert s32.latent_params_flipped is None, "no flipped copy when flip_probability is 0"


def test_text_embeddings_are_the_text_encoders_last_hidden_state(components, tmp_path):
    pairs = make_pairs(2)
    samples, _ = build(LatentCache(LocalStore(), str(tmp_path)), pairs, components,
                       dtype=torch.float32)  # fmt: skip
    tok = components.tokenizer
    ids = tok([pairs[1].caption], padding="max_length", max_length=77, truncation=True,
              return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        expected = components.text_encoder(ids).last_hidden_state[0]
    assert samples[1].text_embeddings.shape == (77, 32)
    torch.testing.assert_close(samples[1].text_embeddings, expected, atol=1e-5, rtol=1e-5)


def test_flipped_latents_are_the_encoding_of_the_mirrored_image(components, tmp_path):
    pairs = make_pairs(2)
    spec = pre(flip_probability=0.5)
    transform = ImageTransform(spec)
    samples, _ = build(LatentCache(LocalStore(), str(tmp_path)), pairs, components, spec,
                       dtype=torch.float32)  # fmt: skip
    for pair, sample in zip(pairs, samples, strict=True):
        flipped = _encode_mean(components, transform, pair, flip=True)
        torch.testing.assert_close(_mean(sample, flipped=True), flipped, atol=1e-5, rtol=1e-5)
        image = decode_rgb(pair.data, pair.name)
        pixels = transform(image, size=None, rng=random.Random(0), flip=False)
        with torch.no_grad():
            mirrored = components.vae.encode(pixels.flip(-1).unsqueeze(0)).latent_dist.mean[0]
        torch.testing.assert_close(_mean(sample, flipped=True), mirrored, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(_mean(sample), _mean(sample, flipped=True), atol=1e-3)


def test_bucketed_samples_keep_their_own_shapes(components, tmp_path):
    sizes_in = [(128, 64), (64, 128), (128, 64)]
    pairs = make_pairs(3, sizes=sizes_in)
    spec = pre(buckets={"enabled": True, "min_size": 64, "max_size": 128, "step": 64})
    seen: list[int] = []
    samples, _ = build(LatentCache(LocalStore(), str(tmp_path)), pairs, components, spec,
                       sizes=sizes_in, progress=seen.append)  # fmt: skip
    assert sum(seen) == 3
    assert [tuple(s.latent_params.shape) for s in samples] == [
        (8, 32, 64),
        (8, 64, 32),
        (8, 32, 64),
    ]
    assert [s.key for s in samples] == [p.key for p in pairs], "input order survives bucketing"


def test_training_draws_a_fresh_latent_from_the_cached_distribution(components, tmp_path):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    (sample,), _ = build(LatentCache(LocalStore(), str(tmp_path)), make_pairs(1), components)
    dist = DiagonalGaussianDistribution(sample.latent_params.float().unsqueeze(0))
    a = dist.sample(generator=torch.Generator().manual_seed(1))
    b = dist.sample(generator=torch.Generator().manual_seed(2))
    assert a.shape == (1, 4, 32, 32)
    assert not torch.equal(a, b)


def test_an_empty_dataset_is_an_empty_hit(components, tmp_path):
    assert build(LatentCache(LocalStore(), str(tmp_path)), [], components) == ([], 0)


def test_sizes_must_match_the_pairs(components, tmp_path):
    with pytest.raises(CacheError, match="sizes has 1 entries for 2 pairs"):
        build(LatentCache(LocalStore(), str(tmp_path)), make_pairs(2), components, sizes=[(64, 64)])


def test_cached_tensors_are_usable_in_training(components, tmp_path):
    # Encoded under inference mode, but what is returned must work with autograd, e.g. as the
    # input of a trained cross-attention projection.
    (sample,), _ = build(LatentCache(LocalStore(), str(tmp_path)), make_pairs(1), components,
                         dtype=torch.float32)  # fmt: skip
    assert not sample.text_embeddings.is_inference()
    assert not sample.latent_params.is_inference()
    layer = torch.nn.Linear(32, 8)
    layer(sample.text_embeddings).sum().backward()
    assert layer.weight.grad is not None


def test_parallel_preparation_gives_the_same_cache(components, tmp_path):
    pairs = make_pairs(5)
    spec = pre(flip_probability=0.5, crop="random", max_rotation_degrees=10)
    serial, _ = build(LatentCache(LocalStore(), str(tmp_path / "a")), pairs, components, spec,
                      workers=1, batch_size=2)  # fmt: skip
    threaded, _ = build(LatentCache(LocalStore(), str(tmp_path / "b")), pairs, components, spec,
                        workers=4, batch_size=2)  # fmt: skip
    for s, t in zip(serial, threaded, strict=True):
        assert s.key == t.key
        assert torch.equal(s.latent_params, t.latent_params)
        assert s.latent_params_flipped is not None and t.latent_params_flipped is not None
        assert torch.equal(s.latent_params_flipped, t.latent_params_flipped)


def test_a_local_copy_serves_samples_that_hold_no_tensors(components, tmp_path):
    pairs = make_pairs(5)
    spec = pre(flip_probability=0.5)
    cache = LatentCache(LocalStore(), str(tmp_path / "store"))
    built, _ = build(cache, pairs, components, spec, batch_size=2)
    local = tmp_path / "local"
    lazy, encoded = build(cache, pairs, components, spec, local_dir=local)
    assert encoded == 0
    assert [s.key for s in lazy] == [p.key for p in pairs]
    for a, b in zip(built, lazy, strict=True):
        assert torch.equal(a.latent_params, b.latent_params)
        assert a.latent_params_flipped is not None and b.latent_params_flipped is not None
        assert torch.equal(a.latent_params_flipped, b.latent_params_flipped)
        assert torch.equal(a.text_embeddings, b.text_embeddings)
        # the sample keeps no tensor: each access reads the memory-mapped local file
        assert not any(isinstance(getattr(b, slot), torch.Tensor) for slot in b.__slots__)
    (shard,) = Path(cache.root, SHARDS_FOLDER).glob("*.safetensors")
    assert sorted(p.name for p in local.iterdir()) == [shard.name, shard.name + ".sha256"]
    # a verified copy is reused: the store's shard is no longer read
    shard.write_bytes(b"gone")
    again, encoded = build(cache, pairs, components, spec, local_dir=local)
    assert encoded == 0 and torch.equal(again[0].text_embeddings, built[0].text_embeddings)


def test_a_local_copy_is_only_trusted_once_verified(components, tmp_path):
    pairs = make_pairs(2)
    cache = LatentCache(LocalStore(), str(tmp_path / "store"))
    built, _ = build(cache, pairs, components)
    (shard,) = Path(cache.root, SHARDS_FOLDER).glob("*.safetensors")
    local = tmp_path / "local"
    # a copy that was never stamped (a process killed mid-copy) is copied again
    local.mkdir()
    (local / shard.name).write_bytes(b"half a shard")
    lazy, encoded = build(cache, pairs, components, local_dir=local)
    assert encoded == 0 and torch.equal(lazy[1].latent_params, built[1].latent_params)
