"""The latent/text-embedding cache: encoded once, reused, rebuilt whenever its inputs change."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difftrain.api import PreprocessingSpec
from difftrain.data.cache import CachedSample, LatentCache, cache_key, sample_rng
from difftrain.data.images import decode_rgb
from difftrain.data.transforms import ImageTransform
from difftrain.models.tiny import build_tiny_components
from difftrain.storage import MANIFEST_NAME, LocalStore, join, read_manifest
from tests.latent_fixtures import make_pairs, spy_on_encoders


@pytest.fixture(scope="module")
def components():
    return build_tiny_components(seed=0)


def pre(**kw) -> PreprocessingSpec:
    return PreprocessingSpec(resolution=64, **kw)


def test_second_run_hits_the_cache_without_calling_the_encoders(components, tmp_path, monkeypatch):
    spies = spy_on_encoders(components, monkeypatch)
    pairs = make_pairs(5)
    cache = LatentCache(LocalStore(), str(tmp_path / ".difftrain-cache"))
    spec = pre()
    key = cache_key(pairs, spec, components.identity)

    first, hit = cache.get_or_build(key, pairs, components, ImageTransform(spec), batch_size=2)
    assert not hit
    assert spies.vae_encode.items == 5 and spies.text_forward.items == 5
    calls = spies.calls

    second, hit = cache.get_or_build(key, pairs, components, ImageTransform(spec), batch_size=2)
    assert hit
    assert spies.calls == calls, "a cache hit must not run the VAE or the text encoder"
    assert [s.key for s in second] == [p.key for p in pairs]
    assert [s.caption for s in second] == [p.caption for p in pairs]
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.latent_params, b.latent_params)
        assert torch.equal(a.text_embeddings, b.text_embeddings)
        assert a.latent_params.dtype == torch.float16


def test_resolution_change_rebuilds_with_the_new_shape(components, tmp_path, monkeypatch):
    spies = spy_on_encoders(components, monkeypatch)
    pairs = make_pairs(2, sizes=[(128, 128), (128, 128)])
    cache = LatentCache(LocalStore(), str(tmp_path))
    small, large = pre(), PreprocessingSpec(resolution=128)
    samples, _ = cache.get_or_build(
        cache_key(pairs, small, components.identity), pairs, components, ImageTransform(small)
    )
    calls = spies.calls
    key_large = cache_key(pairs, large, components.identity)
    rebuilt, hit = cache.get_or_build(key_large, pairs, components, ImageTransform(large))
    assert not hit and spies.calls > calls
    # The tiny VAE downsamples twice: 64 px -> 32, 128 px -> 64; 4 channels -> 8 parameters.
    assert samples[0].latent_params.shape == (8, 32, 32)
    assert rebuilt[0].latent_params.shape == (8, 64, 64)


def test_key_changes_with_caption_model_and_settings():
    pairs = make_pairs(3)
    base = cache_key(pairs, pre(), "model-a")
    assert base == cache_key(make_pairs(3), pre(), "model-a"), "same inputs, same key"
    recaptioned = [*pairs[:2], dataclasses.replace(pairs[2], caption="a new caption")]
    changed = {
        "caption": cache_key(recaptioned, pre(), "model-a"),
        "model": cache_key(pairs, pre(), "model-b"),
        "resolution": cache_key(pairs, PreprocessingSpec(resolution=128), "model-a"),
        "crop": cache_key(pairs, pre(crop="random"), "model-a"),
        "rotation": cache_key(pairs, pre(max_rotation_degrees=5), "model-a"),
        "flips": cache_key(pairs, pre(flip_probability=0.5), "model-a"),
        "buckets": cache_key(pairs, pre(buckets={"enabled": True}), "model-a"),
        "boomerang": cache_key(pairs, pre(boomerang={"enabled": True}), "model-a"),
        "dropped pair": cache_key(pairs[:2], pre(), "model-a"),
        "extra": cache_key(pairs, pre(), "model-a", extra={"seed": "1"}),
    }
    assert base not in changed.values()
    assert len(set(changed.values())) == len(changed)
    # How often flips are used and whether latents are cached do not change the tensors.
    assert cache_key(pairs, pre(flip_probability=0.5), "model-a") == cache_key(
        pairs, pre(flip_probability=0.9), "model-a"
    )


@pytest.mark.parametrize(
    "settings_of",
    [{"crop": "random"}, {"max_rotation_degrees": 5}, {"boomerang": {"enabled": True}}],
)
def test_the_seed_is_in_the_key_where_it_changes_the_tensors(settings_of):
    """Random crops, rotations and Boomerang variants depend on the seed; centre crops do not."""
    pairs = make_pairs(3)
    seeded = pre(**settings_of)
    assert cache_key(pairs, seeded, "m", seed=1) != cache_key(pairs, seeded, "m", seed=2)
    assert cache_key(pairs, pre(), "m", seed=1) == cache_key(pairs, pre(), "m", seed=2)


@settings(max_examples=50, deadline=None)
@given(index=st.integers(0, 2), caption=st.text(max_size=40), content=st.binary(max_size=16))
def test_any_change_of_one_pair_changes_the_key(index, caption, content):
    pairs = make_pairs(3)
    base = cache_key(pairs, pre(), "m")
    edited = list(pairs)
    edited[index] = dataclasses.replace(pairs[index], caption=caption, sha256=content.hex())
    if (caption, content.hex()) == (pairs[index].caption, pairs[index].sha256):
        assert cache_key(edited, pre(), "m") == base
    else:
        assert cache_key(edited, pre(), "m") != base


def test_caption_change_rebuilds(components, tmp_path, monkeypatch):
    spies = spy_on_encoders(components, monkeypatch)
    pairs = make_pairs(2)
    cache = LatentCache(LocalStore(), str(tmp_path))
    transform = ImageTransform(pre())
    cache.get_or_build(cache_key(pairs, pre(), components.identity), pairs, components, transform)
    edited = [pairs[0], dataclasses.replace(pairs[1], caption="a green star")]
    calls = spies.calls
    samples, hit = cache.get_or_build(
        cache_key(edited, pre(), components.identity), edited, components, transform
    )
    assert not hit and spies.calls > calls
    assert samples[1].caption == "a green star"


def test_model_change_rebuilds(components, tmp_path, monkeypatch):
    other = build_tiny_components(seed=1)
    assert other.identity != components.identity
    pairs = make_pairs(2)
    cache = LatentCache(LocalStore(), str(tmp_path))
    transform = ImageTransform(pre())
    cache.get_or_build(cache_key(pairs, pre(), components.identity), pairs, components, transform)
    spies = spy_on_encoders(other, monkeypatch)
    samples, hit = cache.get_or_build(
        cache_key(pairs, pre(), other.identity), pairs, other, transform
    )
    assert not hit and spies.vae_encode.items == 2
    expected = _encode_mean(other, transform, pairs[0])
    torch.testing.assert_close(_mean(samples[0]), expected, atol=2e-2, rtol=2e-2)


def test_incomplete_cache_is_ignored_and_rebuilt(components, tmp_path, monkeypatch):
    pairs = make_pairs(3)
    store = LocalStore()
    cache = LatentCache(store, str(tmp_path))
    key = cache_key(pairs, pre(), components.identity)
    cache.build(key, pairs, components, ImageTransform(pre()))
    # A crash between the shards and the manifest leaves exactly this.
    store.delete(join(cache.prefix(key), MANIFEST_NAME))
    assert any(Path(cache.prefix(key)).glob("shard-*.safetensors"))
    assert cache.lookup(key) is None

    spies = spy_on_encoders(components, monkeypatch)
    samples, hit = cache.get_or_build(key, pairs, components, ImageTransform(pre()))
    assert not hit and spies.vae_encode.items == 3 and len(samples) == 3
    assert read_manifest(store, cache.prefix(key)) is not None
    assert cache.lookup(key) is not None


def test_damaged_shard_is_not_trusted(components, tmp_path):
    pairs = make_pairs(2)
    cache = LatentCache(LocalStore(), str(tmp_path))
    key = cache_key(pairs, pre(), components.identity)
    cache.build(key, pairs, components, ImageTransform(pre()))
    shard = next(Path(cache.prefix(key)).glob("shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert cache.lookup(key) is None


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
    cache = LatentCache(LocalStore(), str(tmp_path))
    exact = cache.build("k32", pairs, components, transform, dtype=torch.float32, batch_size=2)
    half = cache.build("k16", pairs, components, transform, batch_size=2)
    for pair, s32, s16 in zip(pairs, exact, half, strict=True):
        expected = _encode_mean(components, transform, pair)
        torch.testing.assert_close(_mean(s32), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_mean(s16), expected, atol=2e-2, rtol=2e-2)
        assert s32.latent_params_flipped is None, "no flipped copy when flip_probability is 0"


def test_text_embeddings_are_the_text_encoders_last_hidden_state(components, tmp_path):
    pairs = make_pairs(2)
    samples = LatentCache(LocalStore(), str(tmp_path)).build(
        "k", pairs, components, ImageTransform(pre()), dtype=torch.float32
    )
    tok = components.tokenizer
    ids = tok(
        [pairs[1].caption],
        padding="max_length",
        max_length=77,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        expected = components.text_encoder(ids).last_hidden_state[0]
    assert samples[1].text_embeddings.shape == (77, 32)
    torch.testing.assert_close(samples[1].text_embeddings, expected, atol=1e-5, rtol=1e-5)


def test_flipped_latents_are_the_encoding_of_the_mirrored_image(components, tmp_path):
    pairs = make_pairs(2)
    spec = pre(flip_probability=0.5)
    transform = ImageTransform(spec)
    cache = LatentCache(LocalStore(), str(tmp_path))
    key = cache_key(pairs, spec, components.identity)
    cache.build(key, pairs, components, transform, dtype=torch.float32)
    samples = cache.lookup(key)
    assert samples is not None
    for pair, sample in zip(pairs, samples, strict=True):
        flipped = _encode_mean(components, transform, pair, flip=True)
        torch.testing.assert_close(_mean(sample, flipped=True), flipped, atol=1e-5, rtol=1e-5)
        # The mirrored view is the unflipped one mirrored (center crop), and it differs from it.
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
    cache = LatentCache(LocalStore(), str(tmp_path))
    key = cache_key(pairs, spec, components.identity)
    seen: list[int] = []
    cache.build(key, pairs, components, ImageTransform(spec), sizes=sizes_in, progress=seen.append)
    assert sum(seen) == 3
    samples = cache.lookup(key)
    assert samples is not None
    assert [tuple(s.latent_params.shape) for s in samples] == [
        (8, 32, 64),
        (8, 64, 32),
        (8, 32, 64),
    ]
    assert [s.key for s in samples] == [p.key for p in pairs], "input order survives bucketing"


def test_training_draws_a_fresh_latent_from_the_cached_distribution(components, tmp_path):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    (sample,) = LatentCache(LocalStore(), str(tmp_path)).build(
        "k", make_pairs(1), components, ImageTransform(pre())
    )
    dist = DiagonalGaussianDistribution(sample.latent_params.float().unsqueeze(0))
    a = dist.sample(generator=torch.Generator().manual_seed(1))
    b = dist.sample(generator=torch.Generator().manual_seed(2))
    assert a.shape == (1, 4, 32, 32)
    assert not torch.equal(a, b)


def test_an_empty_dataset_commits_an_empty_cache(components, tmp_path):
    cache = LatentCache(LocalStore(), str(tmp_path))
    assert cache.build("k", [], components, ImageTransform(pre())) == []
    assert cache.lookup("k") == []


def test_sizes_must_match_the_pairs(components, tmp_path):
    from difftrain.data.cache import CacheError

    cache = LatentCache(LocalStore(), str(tmp_path))
    with pytest.raises(CacheError, match="sizes has 1 entries for 2 pairs"):
        cache.build("k", make_pairs(2), components, ImageTransform(pre()), sizes=[(64, 64)])


def test_cached_tensors_are_usable_in_training(components, tmp_path):
    # Encoded under inference mode, but what is returned must work with autograd, e.g. as the
    # input of a trained cross-attention projection.
    (sample,) = LatentCache(LocalStore(), str(tmp_path)).build(
        "k", make_pairs(1), components, ImageTransform(pre()), dtype=torch.float32
    )
    assert not sample.text_embeddings.is_inference()
    assert not sample.latent_params.is_inference()
    layer = torch.nn.Linear(32, 8)
    layer(sample.text_embeddings).sum().backward()
    assert layer.weight.grad is not None


def test_parallel_preparation_gives_the_same_cache(components, tmp_path):
    pairs = make_pairs(5)
    spec = pre(flip_probability=0.5, crop="random", max_rotation_degrees=10)
    cache = LatentCache(LocalStore(), str(tmp_path))
    serial = cache.build("a", pairs, components, ImageTransform(spec), workers=1, batch_size=2)
    threaded = cache.build("b", pairs, components, ImageTransform(spec), workers=4, batch_size=2)
    for s, t in zip(serial, threaded, strict=True):
        assert s.key == t.key
        assert torch.equal(s.latent_params, t.latent_params)
        assert s.latent_params_flipped is not None and t.latent_params_flipped is not None
        assert torch.equal(s.latent_params_flipped, t.latent_params_flipped)


def test_a_local_copy_serves_samples_that_hold_no_tensors(components, tmp_path):
    pairs = make_pairs(5)
    spec = pre(flip_probability=0.5)
    cache = LatentCache(LocalStore(), str(tmp_path / "store"))
    key = cache_key(pairs, spec, components.identity)
    built = cache.build(key, pairs, components, ImageTransform(spec), batch_size=2)
    local = tmp_path / "local"

    lazy = cache.lookup(key, local_dir=local)
    assert lazy is not None
    assert [s.key for s in lazy] == [p.key for p in pairs]
    assert [s.caption for s in lazy] == [p.caption for p in pairs]
    for a, b in zip(built, lazy, strict=True):
        assert torch.equal(a.latent_params, b.latent_params)
        assert a.latent_params_flipped is not None and b.latent_params_flipped is not None
        assert torch.equal(a.latent_params_flipped, b.latent_params_flipped)
        assert torch.equal(a.text_embeddings, b.text_embeddings)
        # the sample keeps no tensor: each access reads the memory-mapped local file
        assert not any(isinstance(getattr(b, slot), torch.Tensor) for slot in b.__slots__)
    copies = sorted(p.name for p in (local / key).iterdir())
    assert copies == ["shard-00000.safetensors", "shard-00000.safetensors.sha256"]

    # a verified copy is reused: the store's shard is no longer read
    for shard in Path(cache.prefix(key)).glob("shard-*.safetensors"):
        shard.write_bytes(b"gone")
    again = cache.lookup(key, local_dir=local)
    assert again is not None and torch.equal(again[0].text_embeddings, built[0].text_embeddings)


def test_a_local_copy_is_only_trusted_once_verified(components, tmp_path):
    pairs = make_pairs(2)
    cache = LatentCache(LocalStore(), str(tmp_path / "store"))
    key = cache_key(pairs, pre(), components.identity)
    built = cache.build(key, pairs, components, ImageTransform(pre()))
    local = tmp_path / "local"
    # a copy that was never stamped (a process killed mid-copy) is copied again
    (local / key).mkdir(parents=True)
    (local / key / "shard-00000.safetensors").write_bytes(b"half a shard")
    lazy = cache.lookup(key, local_dir=local)
    assert lazy is not None and torch.equal(lazy[1].latent_params, built[1].latent_params)
    # a damaged shard in the store is not copied
    shard = next(Path(cache.prefix(key)).glob("shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert cache.lookup(key, local_dir=tmp_path / "other") is None
