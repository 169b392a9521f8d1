"""Raw batches: uint8 images built on threads, normalised where the step reads them."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from difftrain.api import PreprocessingSpec
from difftrain.data.images import decode_rgb
from difftrain.data.transforms import ImageTransform, to_model_range, to_unit_range
from difftrain.train.batches import Batch, BatchBuilder, Example
from tests.datasets import encode, synthetic_image

SEED = 7


def _examples(n: int, *, conditioning: bool = False) -> list[Example]:
    out = []
    for i in range(n):
        image = synthetic_image(i, (96 + 8 * i, 80))
        cond = encode(synthetic_image(100 + i, (96 + 8 * i, 80)), "PNG") if conditioning else None
        data = encode(image, "JPEG", quality=90)
        out.append(
            Example(key=f"k{i}", caption=f"c{i}", size=(64, 48), data=data, conditioning=cond)
        )
    return out


def _builder(examples: list[Example], transform: ImageTransform, workers: int) -> BatchBuilder:
    return BatchBuilder(
        examples,
        seed=SEED,
        transform=transform,
        decode=decode_rgb,
        flip_probability=0.5,
        caption_dropout=0.0,
        scaling_factor=0.18215,
        workers=workers,
    )


def _transform() -> ImageTransform:
    pre = PreprocessingSpec.model_validate(
        {"resolution": 64, "flipProbability": 0.5, "crop": "random", "maxRotationDegrees": 5}
    )
    return ImageTransform(pre)


def test_raw_batches_hold_uint8_that_normalise_to_the_float_transform():
    examples = _examples(5, conditioning=True)
    transform = _transform()
    builder = _builder(examples, transform, workers=3)
    indices = [3, 0, 4, 1]
    batch = builder(2, 0, indices)
    assert batch.pixels is not None and batch.conditioning is not None
    assert batch.pixels.dtype == torch.uint8 and batch.conditioning.dtype == torch.uint8
    assert batch.pixels.shape == (4, 3, 48, 64)
    # what each example gave as a float tensor before batches held uint8: the same draws
    expected, expected_cond = [], []
    for i in indices:
        rng = random.Random(f"{SEED}:2:{i}")
        flip = rng.random() < 0.5
        rng.random()  # caption dropout's draw
        image = decode_rgb(examples[i].data or b"", examples[i].key)
        expected.append(transform(image, size=(64, 48), rng=rng, flip=flip))
        cond = decode_rgb(examples[i].conditioning or b"", examples[i].key)
        old = transform(cond, size=(64, 48), rng=random.Random(0), flip=False)
        expected_cond.append((old + 1.0) / 2.0)
    model_input = to_model_range(batch.pixels)
    assert model_input.dtype == torch.float32
    assert torch.equal(model_input, torch.stack(expected))
    torch.testing.assert_close(
        to_unit_range(batch.conditioning), torch.stack(expected_cond), atol=1e-6, rtol=0
    )


def test_batches_are_the_same_whatever_the_number_of_image_threads():
    examples = _examples(6)
    transform = _transform()
    one, four = _builder(examples, transform, 1), _builder(examples, transform, 4)
    try:
        for epoch in (0, 1):
            a, b = one(epoch, 0, [5, 2, 0, 3, 1]), four(epoch, 0, [5, 2, 0, 3, 1])
            assert a.pixels is not None and b.pixels is not None
            assert torch.equal(a.pixels, b.pixels)
            assert a.captions == b.captions
    finally:
        four.close()


class _RecordingVAE(torch.nn.Module):
    """A VAE whose latent mean is its input, downsampled: records what the step fed it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.config = SimpleNamespace(scaling_factor=1.0)
        self.seen: list[torch.Tensor] = []

    def encode(self, pixels: torch.Tensor) -> SimpleNamespace:
        self.seen.append(pixels)
        mean = pixels[:, :, ::8, ::8] * self.weight
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=torch.zeros_like(mean)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_training_step_encodes_the_batch_in_minus_one_to_one(dtype):
    from difftrain.train.loop import Trainer

    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 16, 16))).to(
        torch.uint8
    )
    vae = _RecordingVAE().to(dtype)
    trainer = SimpleNamespace(inp=SimpleNamespace(components=SimpleNamespace(vae=vae)))
    Trainer._latents(trainer, Batch(captions=["a", "b"], pixels=pixels), torch.Generator())  # type: ignore[arg-type]
    (seen,) = vae.seen
    assert seen.dtype == dtype
    # the old float transform's values: x / 127.5 - 1, in float32, then the VAE's dtype
    old = (pixels.float() / 127.5 - 1.0).to(dtype)
    torch.testing.assert_close(seen, old, atol=1 / 255, rtol=0)
    assert seen.float().min() >= -1.0 and seen.float().max() <= 1.0


def test_to_model_range_maps_0_and_255_to_minus_one_and_one():
    ends = torch.tensor([0, 255], dtype=torch.uint8).view(1, 2, 1).expand(3, 2, 1)
    out = to_model_range(ends)
    assert torch.equal(out[:, 0], torch.full((3, 1), -1.0))
    assert torch.equal(out[:, 1], torch.full((3, 1), 1.0))
    assert torch.equal(to_unit_range(ends)[:, 1], torch.ones(3, 1))


def test_pixels_of_a_greyscale_image_are_rgb():
    image = Image.fromarray(np.full((40, 50), 128, dtype=np.uint8), "L")
    pixels = _transform().pixels(image, size=(32, 32), rng=random.Random(0), flip=False)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 32, 32)


@pytest.mark.parametrize("size", [(64, 48), (40, 30)])
def test_pixels_are_the_images_own_resized_with_pytorchs_uint8_kernels(size):
    import torch.nn.functional as F  # noqa: N812 - the usual name

    image = decode_rgb(encode(synthetic_image(3, (64, 48)), "JPEG"), "x")
    pre = PreprocessingSpec.model_validate({"resolution": 64, "flipProbability": 0.0})
    pixels = ImageTransform(pre).pixels(image, size=size, rng=random.Random(0))
    own = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    if size == image.size:
        assert torch.equal(pixels, own)
    else:
        expected = F.interpolate(own[None], size=size[::-1], mode="bilinear", antialias=True)[0]
        assert torch.equal(pixels, expected)
