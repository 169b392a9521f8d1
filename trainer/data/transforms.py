"""Image -> training tensor: resize, crop, rotate, flip; uint8 pixels, or normalised to [-1, 1].

The geometry is computed first and applied in as few resampling passes as possible:

- no rotation: the crop box is cut out of the decoded pixels and resized in one antialiased pass
  (PyTorch's uint8 kernels, about twice as fast as Pillow's), which is what a resize followed by
  a crop gives, without resizing the pixels that are thrown away;
- rotation by a: the largest crop of the target's aspect ratio that fits inside the rotated
  image (so no empty corner ever appears) is ``k`` times the target with
  ``k = min(w / (W|cos a| + H|sin a|), h / (W|sin a| + H|cos a|))``; the image is first
  downscaled (antialiased) by about ``1/k``, then one bicubic affine transform rotates and crops
  it, with a margin of a few pixels so the interpolation never reaches past the edge.

A random crop draws the crop's centre uniformly over every position where it fits. The random
draws are made in a fixed order (angle, crop position, flip), and a flip given explicitly draws
nothing, so ``flip=True`` is exactly the mirror image of ``flip=False`` for the same ``rng`` state.
"""

from __future__ import annotations

import math
import random
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual name
from PIL import Image

from difftrain.api import PreprocessingSpec
from difftrain.data.images import decode_rgb

# Pixels kept clear of the source's edge when rotating: bicubic reads two pixels either side.
_EDGE_MARGIN = 2.5


class ImageTransform:
    """The preprocessing of one training setup; calling it turns an image into a tensor."""

    def __init__(self, pre: PreprocessingSpec) -> None:
        self.pre = pre
        self.max_angle = math.radians(pre.max_rotation_degrees)

    def target(self, size: tuple[int, int] | None) -> tuple[int, int]:
        """(width, height) of the output: ``size`` or the square resolution."""
        return size if size is not None else (self.pre.resolution, self.pre.resolution)

    def decode_size(self, size: tuple[int, int] | None = None) -> tuple[int, int]:
        """The smallest (width, height) a decoded image must cover to give full detail at the
        target, whatever the angle drawn: the ``draft`` for :func:`decode_rgb`."""
        width, height = self.target(size)
        if self.max_angle == 0:
            return width, height
        angles = [0.0, self.max_angle] + [
            a for a in (math.atan2(height, width), math.atan2(width, height)) if a < self.max_angle
        ]
        need_w = max(width * math.cos(a) + height * math.sin(a) for a in angles)
        need_h = max(width * math.sin(a) + height * math.cos(a) for a in angles)
        return math.ceil(need_w + 2 * _EDGE_MARGIN), math.ceil(need_h + 2 * _EDGE_MARGIN)

    def decode(self, data: bytes, name: str, *, size: tuple[int, int] | None = None) -> Image.Image:
        """Decode an image no larger than this transform needs (JPEG reduce-on-load)."""
        return decode_rgb(data, name, draft=self.decode_size(size))

    def __call__(
        self,
        image: Image.Image,
        *,
        size: tuple[int, int] | None = None,
        rng: random.Random,
        flip: bool | None = None,
    ) -> torch.Tensor:
        """A float32 (3, height, width) tensor in [-1, 1]; a pure function of the image, the size
        and the state of ``rng``: :meth:`pixels`, normalised."""
        return _normalise(self.pixels(image, size=size, rng=rng, flip=flip))

    def pixels(
        self,
        image: Image.Image,
        *,
        size: tuple[int, int] | None = None,
        rng: random.Random,
        flip: bool | None = None,
    ) -> torch.Tensor:
        """The same image as :meth:`__call__` gives, as uint8 (3, height, width) in [0, 255]
        (possibly a non-contiguous view): what training batches hold, normalised on the device
        by :func:`to_model_range` (a quarter of the bytes to stack, pin and copy, and no float
        pass in the worker threads)."""
        return self.pixels_and_sizes(image, size=size, rng=rng, flip=flip)[0]

    def pixels_and_sizes(
        self,
        image: Image.Image,
        *,
        size: tuple[int, int] | None = None,
        rng: random.Random,
        flip: bool | None = None,
    ) -> tuple[torch.Tensor, SizeConditioning]:
        """:meth:`pixels` and how they were cut: the image's size, the crop's top-left corner
        in the image scaled to cover the target (mirrored with the flip), and the target (SDXL's
        time ids; the same draws as :meth:`pixels`)."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        width, height = self.target(size)
        angle = rng.uniform(-self.max_angle, self.max_angle) if self.max_angle > 0 else 0.0
        shift = (
            (rng.uniform(-1.0, 1.0), rng.uniform(-1.0, 1.0))
            if self.pre.crop == "random"
            else (0.0, 0.0)
        )
        if angle == 0.0 or min(image.size) <= 4 * _EDGE_MARGIN:  # too few pixels to rotate
            pixels = _resize_crop(image, width, height, shift)
        else:
            pixels = _chw(_rotate_crop(image, width, height, angle, shift))
        if flip is None:
            flip = self.pre.flip_probability > 0 and rng.random() < self.pre.flip_probability
        if flip:
            pixels = pixels.flip(-1)
        top, left = _crop_corner(image.size, width, height, shift, flip)
        sizes = SizeConditioning((image.height, image.width), (top, left), (height, width))
        return pixels, sizes


class SizeConditioning(NamedTuple):
    """How one training image was cut, as (height, width) and (top, left) pixel pairs."""

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]


def _crop_corner(
    image_size: tuple[int, int], width: int, height: int, shift: tuple[float, float], flip: bool
) -> tuple[int, int]:
    """The crop's (top, left) in the image scaled so that it just covers (width, height): the
    box :func:`_resize_crop` cuts (a rotated crop's centre is placed the same way)."""
    w, h = image_size
    k = min(w / width, h / height)
    box_w = min(w, max(1, round(k * width)))
    box_h = min(h, max(1, round(k * height)))
    x0 = (w - box_w) / 2 * (1 + shift[0])
    y0 = (h - box_h) / 2 * (1 + shift[1])
    if flip:  # the mirrored image's crop starts as far from its left as this one ends from ours
        x0 = w - box_w - x0
    return round(y0 / k), round(x0 / k)


def _resample(scale: float) -> Image.Resampling:
    # Downscaling: bilinear with antialiasing (the filter widened by the scale), as the diffusers
    # training examples do; upscaling: bicubic, which keeps edges sharper.
    return Image.Resampling.BILINEAR if scale <= 1.0 else Image.Resampling.BICUBIC


def _chw(image: Image.Image) -> torch.Tensor:
    """An RGB image's pixels as a uint8 (3, H, W) view (no reordering copy)."""
    return _rgbx(image)[:3]


def _rgbx(image: Image.Image) -> torch.Tensor:
    """An RGB image's pixels as a uint8 (4, H, W) channels-last view, the fourth channel padding.

    Pillow keeps an RGB pixel in four bytes; pasting them into an array that a 4-channel image
    shares is one copy made with the GIL released, where ``np.array(image)`` (``tobytes``) packs
    to three bytes, joins and copies again holding it, which serialised the worker threads (about
    0.7 ms per 768x640 image, measured with py-spy --gil). Four channels also keep PyTorch's
    uint8 antialiasing kernels on their fast path.
    """
    width, height = image.size
    out = np.empty((height, width, 4), dtype=np.uint8)
    shared = Image.frombuffer("RGBA", image.size, out, "raw", "RGBA", 0, 1)
    try:
        shared.im.paste(image.im, (0, 0, width, height))  # the core's paste: no mode checks
    except ValueError:  # pixels not four bytes (a Pillow that stores RGB otherwise)
        out[..., :3] = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(out).permute(2, 0, 1)


def _resize_crop(
    image: Image.Image, width: int, height: int, shift: tuple[float, float]
) -> torch.Tensor:
    w, h = image.size
    k = min(w / width, h / height)  # the crop box is k times the target
    box_w = min(w, max(1, round(k * width)))
    box_h = min(h, max(1, round(k * height)))
    x0 = round((w - box_w) / 2 * (1 + shift[0]))
    y0 = round((h - box_h) / 2 * (1 + shift[1]))
    pixels = _rgbx(image)[:, y0 : y0 + box_h, x0 : x0 + box_w]
    if (box_w, box_h) == (width, height):
        return pixels[:3]
    mode = "bilinear" if k >= 1 else "bicubic"
    # uint8 in and out, channels last: PyTorch's vectorised antialiasing kernels for images
    resized = F.interpolate(
        pixels.unsqueeze(0), size=(height, width), mode=mode, antialias=True, align_corners=False
    )
    return resized[0, :3]


def _rotate_crop(
    image: Image.Image, width: int, height: int, angle: float, shift: tuple[float, float]
) -> Image.Image:
    cos, sin = math.cos(angle), math.sin(angle)
    ext_w = width * abs(cos) + height * abs(sin)  # the crop's extent in the source's axes
    ext_h = width * abs(sin) + height * abs(cos)

    def scale_for(w: float, h: float) -> float:
        return min((w - 2 * _EDGE_MARGIN) / ext_w, (h - 2 * _EDGE_MARGIN) / ext_h)

    k = scale_for(*image.size)
    if k > 1.0:  # downscale first, antialiased, so the affine pass only rotates
        w, h = image.size
        image = image.resize(
            (max(1, round(w / k)), max(1, round(h / k))),
            _resample(1 / k),
            reducing_gap=3.0,
        )
        k = scale_for(*image.size)
    w, h = image.size
    slack_x = max(0.0, (w - 2 * _EDGE_MARGIN - k * ext_w) / 2)
    slack_y = max(0.0, (h - 2 * _EDGE_MARGIN - k * ext_h) / 2)
    cx, cy = w / 2 + shift[0] * slack_x, h / 2 + shift[1] * slack_y
    # output (x, y) -> source: centre + R(angle) * k * ((x, y) - output centre)
    a, b, d, e = k * cos, -k * sin, k * sin, k * cos
    c = cx - a * width / 2 - b * height / 2
    f = cy - d * width / 2 - e * height / 2
    return image.transform(
        (width, height),
        Image.Transform.AFFINE,
        (a, b, c, d, e, f),
        resample=Image.Resampling.BICUBIC,
        fillcolor=(0, 0, 0),
    )


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a contiguous float32 (3, H, W) tensor in [-1, 1]."""
    return _normalise(_chw(image))


def to_model_range(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images (..., 3, H, W) in [0, 255] as ``dtype`` in [-1, 1], computed in float32
    where the tensor is (on the device, for a batch): exactly what :meth:`ImageTransform.__call__`
    gives for the same pixels."""
    return _normalise(pixels).to(dtype)


def to_unit_range(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images in [0, 255] as ``dtype`` in [0, 1] (ControlNet's conditioning)."""
    return pixels.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0).to(dtype)


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    # One pass that converts, reorders to contiguous channels-first and scales.
    out = pixels.to(torch.float32, memory_format=torch.contiguous_format)
    return out.div_(127.5).sub_(1.0)
