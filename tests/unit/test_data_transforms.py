"""Transforms: shape and range, flip equivalence, no empty corners after rotation, determinism."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from difftrain.api import PreprocessingSpec
from difftrain.data.transforms import ImageTransform, to_tensor
from tests.datasets import jpeg, synthetic_image


def transform(**kw) -> ImageTransform:
    return ImageTransform(PreprocessingSpec.model_validate({"resolution": 64, **kw}))


sides = st.integers(8, 260)
targets = st.tuples(st.integers(1, 24), st.integers(1, 24)).map(lambda t: (t[0] * 8, t[1] * 8))
setups = st.fixed_dictionaries(
    {
        "crop": st.sampled_from(["center", "random"]),
        "maxRotationDegrees": st.sampled_from([0.0, 5.0, 20.0, 45.0]),
        "flipProbability": st.sampled_from([0.0, 0.5, 1.0]),
    }
)


@settings(max_examples=60, deadline=None)
@given(w=sides, h=sides, size=targets, setup=setups, seed=st.integers(0, 2**32))
def test_output_has_the_target_shape_and_range(w, h, size, setup, seed):
    out = transform(**setup)(
        synthetic_image(seed % 1000, (w, h)), size=size, rng=random.Random(seed)
    )
    assert out.shape == (3, size[1], size[0])
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert float(out.min()) >= -1.0 and float(out.max()) <= 1.0


@settings(max_examples=40, deadline=None)
@given(w=sides, h=sides, size=targets, setup=setups, seed=st.integers(0, 2**32))
def test_flip_true_is_the_mirror_of_flip_false(w, h, size, setup, seed):
    t, image = transform(**setup), synthetic_image(seed % 1000, (w, h))
    plain = t(image, size=size, rng=random.Random(seed), flip=False)
    mirrored = t(image, size=size, rng=random.Random(seed), flip=True)
    assert torch.equal(mirrored, torch.flip(plain, dims=[-1]))


@settings(max_examples=40, deadline=None)
@given(
    w=st.integers(40, 300),
    h=st.integers(40, 300),
    size=targets,
    crop=st.sampled_from(["center", "random"]),
    seed=st.integers(0, 2**32),
)
def test_rotation_leaves_no_empty_corners(w, h, size, crop, seed):
    # A white image rotated by up to the largest angle: any fill (black) would show as a dark pixel.
    white = Image.new("RGB", (w, h), (255, 255, 255))
    t = transform(crop=crop, maxRotationDegrees=45.0)
    out = t(white, size=size, rng=random.Random(seed))
    assert float(out.min()) > 0.96


def test_rotation_actually_rotates():
    stripes = np.zeros((200, 200, 3), np.uint8)
    stripes[:, ::20] = 255  # vertical lines
    image = Image.fromarray(stripes)
    t = transform(maxRotationDegrees=30.0)
    angles = [random.Random(s).uniform(-30, 30) for s in range(3)]
    outs = [t(image, rng=random.Random(s)) for s in range(3)]
    straight = transform()(image, rng=random.Random(0))
    # vertical lines stay constant down each column only when the image is not rotated
    column_spread = [float(o[0].std(dim=0).mean()) for o in outs]
    assert float(straight[0].std(dim=0).mean()) < 0.05
    assert all(abs(a) > 5 for a in angles) and all(s > 0.2 for s in column_spread)


def test_center_crop_is_deterministic_and_takes_the_middle():
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, :46] = (255, 0, 0)  # the middle 100x100 plus the filter's reach on either side is green
    arr[:, 46:154] = (0, 255, 0)
    arr[:, 154:] = (0, 0, 255)
    image = Image.fromarray(arr)
    t = transform(crop="center")
    outs = [t(image, rng=random.Random(s)) for s in range(5)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    green = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1)
    assert torch.allclose(outs[0], green.expand(3, 64, 64), atol=0.02)


def test_random_crop_depends_only_on_the_rng_state():
    image = synthetic_image(3, (240, 120))
    t = transform(crop="random", maxRotationDegrees=10.0, flipProbability=0.5)
    a = t(image, rng=random.Random(7))
    assert torch.equal(a, t(image, rng=random.Random(7)))
    others = [t(image, rng=random.Random(s)) for s in range(8, 14)]
    assert not all(torch.equal(a, o) for o in others)


@pytest.mark.parametrize("probability", [0.0, 1.0])
def test_flip_probability_is_honoured(probability):
    image = synthetic_image(4, (96, 96))
    base = transform()(image, rng=random.Random(0))
    out = transform(flipProbability=probability)(image, rng=random.Random(0))
    expected = torch.flip(base, dims=[-1]) if probability else base
    assert torch.equal(out, expected)


def test_small_images_are_upscaled_to_the_target():
    out = transform()(synthetic_image(5, (20, 30)), size=(64, 96), rng=random.Random(0))
    assert out.shape == (3, 96, 64)


def test_normalisation_maps_0_and_255_to_minus_one_and_one():
    arr = np.zeros((2, 2, 3), np.uint8)
    arr[0, 0] = 255
    out = to_tensor(Image.fromarray(arr))
    assert out[:, 0, 0].tolist() == [1.0, 1.0, 1.0] and out[:, 1, 1].tolist() == [-1.0] * 3


def test_decode_size_covers_the_target_and_grows_with_rotation():
    assert transform().decode_size((64, 48)) == (64, 48)
    w, h = transform(maxRotationDegrees=20.0).decode_size((64, 48))
    assert w > 64 and h > 48
    image = transform(maxRotationDegrees=20.0).decode(jpeg(1, (768, 640)), "a.jpg", size=(64, 48))
    assert image.size[0] >= w and image.size[1] >= h and image.size[0] < 768
