"""Decoding of dataset images: JPEG, PNG and WebP in, upright RGB out.

Every image is decoded in full (a truncated file fails here, not in the middle of training), turned
upright by its EXIF orientation, and converted to RGB: palette images through their palette,
transparent ones composited on white (a transparent background would otherwise become black, which
is rarely what the picture meant), grey, 16-bit and CMYK ones converted.

JPEG decoding can be reduced on load (``draft``): libjpeg scales the DCT by 1/2, 1/4 or 1/8 for a
fraction of the cost of a full decode and a resize, while every byte of the file is still read, so
truncation is still caught. The scale is chosen so the result still covers the requested size.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP"})  # MPO: JPEG with extra frames (phone cameras)
EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = frozenset({5, 6, 7, 8})  # EXIF orientations that rotate by 90 or 270 degrees


class ImageError(ValueError):
    """An image that cannot be used: unreadable, truncated or not an image; names the file."""


@dataclass(frozen=True)
class DecodedImage:
    """An upright RGB image and the size of the file's full-resolution, upright image.

    ``width``/``height`` are the true dimensions even when ``image`` was reduced on load.
    """

    image: Image.Image
    width: int
    height: int


def decode_rgb(data: bytes, name: str, *, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``data`` (JPEG, PNG or WebP) into an upright RGB image; raise ImageError if unusable.

    ``draft=(width, height)``: a JPEG may be decoded at a reduced scale as long as the upright
    result still covers that size in both dimensions.
    """
    return decode(data, name, draft=draft).image


def decode(data: bytes, name: str, *, draft: tuple[int, int] | None = None) -> DecodedImage:
    """Like :func:`decode_rgb`, also returning the full-resolution size."""
    try:
        with warnings.catch_warnings():
            # A decompression-bomb warning becomes an error: such files are not training images.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im: Image.Image = Image.open(io.BytesIO(data))
            if im.format not in FORMATS:
                raise ImageError(
                    f"{name}: {im.format} images are not supported; use JPEG, PNG or WebP"
                )
            orientation = _orientation(im)
            width, height = im.size
            if orientation in _SWAPS_AXES:
                width, height = height, width
            if draft is not None and im.format in {"JPEG", "MPO"}:
                want = draft[::-1] if orientation in _SWAPS_AXES else draft
                im.draft("RGB", (max(1, want[0]), max(1, want[1])))
            im.load()
            if orientation not in (None, 1):
                im = ImageOps.exif_transpose(im)
            rgb = to_rgb(im)
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: not a readable image (JPEG, PNG or WebP)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports truncated and malformed data as OSError or SyntaxError.
        raise ImageError(f"{name}: corrupt or truncated image ({exc})") from None
    return DecodedImage(rgb, width, height)


def _orientation(im: Image.Image) -> int | None:
    try:
        value = im.getexif().get(EXIF_ORIENTATION)
    except (OSError, SyntaxError, ValueError):
        return None  # unreadable EXIF: keep the pixels as stored
    return value if isinstance(value, int) and 1 <= value <= 8 else None


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparency is composited on white."""
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in {"I;16", "I;16B", "I;16L", "I", "F"}:
        # 16-bit and float grey: scale to 8 bits instead of clipping everything above 255.
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in {"RGBA", "LA", "PA", "RGBa", "La"}:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")
