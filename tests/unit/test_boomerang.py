"""Boomerang augmentation: seeded local variants, further from the source at higher strength."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import torch
from PIL import Image

from difftrain.api import PreprocessingSpec
from difftrain.data.boomerang import BoomerangError, boomerang_variants
from difftrain.data.cache import sample_rng
from difftrain.data.images import decode_rgb
from difftrain.data.transforms import ImageTransform
from difftrain.models.tiny import build_tiny_components
from tests.latent_fixtures import make_pairs

STEPS = 10


@pytest.fixture(scope="module")
def components():
    return build_tiny_components(seed=0)


@pytest.fixture(scope="module")
def transform():
    return ImageTransform(PreprocessingSpec(resolution=64))


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)


def source_tensor(pair, transform) -> torch.Tensor:
    """The transformed source image (what the variant started from), in [-1, 1]."""
    image = decode_rgb(pair.data, pair.name)
    tensor: torch.Tensor = transform(image, size=None, rng=sample_rng(0, pair.key), flip=False)
    return tensor


def to_pixels(tensor: torch.Tensor) -> np.ndarray:
    return ((tensor.clamp(-1, 1).permute(1, 2, 0).double().numpy() + 1.0) * 127.5).round()


def test_copies_per_pair_with_keys_captions_and_hashes(components, transform):
    pairs = make_pairs(2)
    ticks: list[int] = []
    variants = boomerang_variants(
        pairs,
        components,
        transform,
        strength=0.3,
        copies=3,
        seed=0,
        num_inference_steps=STEPS,
        progress=ticks.append,
    )
    assert len(variants) == 6 and sum(ticks) == 6
    assert [v.key for v in variants] == [f"{p.key}~boomerang{i}" for p in pairs for i in range(3)]
    for variant in variants:
        source = next(p for p in pairs if variant.key.startswith(p.key))
        assert variant.caption == source.caption
        assert variant.sha256 == hashlib.sha256(variant.data).hexdigest()
        assert variant.data.startswith(b"\x89PNG")
        assert (variant.width, variant.height) == (64, 64)
        assert decode_rgb(variant.data, variant.name).size == (64, 64)
    # Copies of one image are different draws, not the same variant three times.
    assert len({v.sha256 for v in variants}) == 6


def test_variants_are_deterministic_for_a_seed(components, transform):
    pairs = make_pairs(2)

    def run(seed: int, order) -> dict[str, str]:
        out = boomerang_variants(
            order,
            components,
            transform,
            strength=0.5,
            copies=1,
            seed=seed,
            num_inference_steps=STEPS,
        )
        return {v.key: v.sha256 for v in out}

    first = run(7, pairs)
    assert run(7, pairs) == first
    assert run(7, list(reversed(pairs))) == first, "a variant does not depend on the pairs' order"
    assert run(8, pairs) != first


def test_variants_differ_from_their_source_more_at_higher_strength(components, transform):
    pairs = make_pairs(4)
    sources = [source_tensor(p, transform) for p in pairs]
    # The tiny VAE is random, so even an unnoised round trip is far from the source in pixels.
    # The round trip is what strength 0 would give; the distance from it isolates what the
    # noising and denoising changed (with a trained VAE the round trip is close to the source).
    with torch.no_grad():
        round_trips = [
            components.vae.decode(components.vae.encode(s[None]).latent_dist.mean).sample[0]
            for s in sources
        ]
    to_source: dict[float, list[float]] = {}
    to_round_trip: dict[float, list[float]] = {}
    for strength in (0.2, 0.8):
        variants = boomerang_variants(
            pairs,
            components,
            transform,
            strength=strength,
            copies=1,
            seed=0,
            num_inference_steps=STEPS,
        )
        to_source[strength] = [
            float(np.abs(pixels(v.data) - to_pixels(s)).mean())
            for v, s in zip(variants, sources, strict=True)
        ]
        to_round_trip[strength] = [
            float(np.abs(pixels(v.data) - to_pixels(r)).mean())
            for v, r in zip(variants, round_trips, strict=True)
        ]
    assert all(d > 1.0 for d in to_source[0.2]), "a variant is not a copy of its source"
    for low, high in zip(to_round_trip[0.2], to_round_trip[0.8], strict=True):
        assert high > low, (to_round_trip, to_source)


def test_guidance_runs_with_an_unconditional_branch(components, transform):
    pairs = make_pairs(1)
    plain = boomerang_variants(
        pairs, components, transform, strength=0.5, copies=1, seed=0, num_inference_steps=STEPS
    )
    guided = boomerang_variants(
        pairs,
        components,
        transform,
        strength=0.5,
        copies=1,
        seed=0,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
    )
    assert plain[0].sha256 != guided[0].sha256


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"strength": 0.0}, "strength is 0.0"),
        ({"strength": 1.0}, "strength is 1.0"),
        ({"copies": 0}, "copies is 0"),
        ({"num_inference_steps": 0}, "num_inference_steps is 0"),
    ],
)
def test_bad_settings_are_refused_by_name(components, transform, kw, message):
    args = {"strength": 0.5, "copies": 1, "seed": 0, **kw}
    with pytest.raises(BoomerangError, match=message):
        boomerang_variants(make_pairs(1), components, transform, **args)


def test_no_gradients_are_kept(components, transform):
    boomerang_variants(
        make_pairs(1), components, transform, strength=0.2, copies=1, seed=0, num_inference_steps=2
    )
    assert all(p.grad is None for p in components.unet.parameters())
    assert torch.is_grad_enabled()
