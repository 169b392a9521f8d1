"""Decoding of dataset images: JPEG, PNG, WebP, GIF, BMP, TIFF and AVIF in, upright RGB out.

Every image is decoded in full (a truncated file fails here, not in the middle of training), turned
upright by its EXIF orientation, and converted to RGB: palette images through their palette,
transparent ones composited on white (a transparent background would otherwise become black, which
is rarely what the picture meant), grey, 16-bit and CMYK ones converted. Of an animated or
multi-page file (GIF, WebP, APNG, TIFF) the first frame is used, and ``frames`` says how many there
were so cleaning can note it. AVIF is read when this Pillow was built with libavif.

JPEG decoding can be reduced on load (``draft``): libjpeg scales the DCT by 1/2, 1/4 or 1/8 for a
fraction of the cost of a full decode and a resize, while every byte of the file is still read, so
truncation is still caught. The scale is chosen so the result still covers the requested size.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

AVIF = bool(features.check("avif"))
# MPO: JPEG with extra frames (phone cameras); DIB: BMP without its file header.
FORMATS = frozenset(
    {"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF"} | ({"AVIF"} if AVIF else set())
)
# File names that are read as images (the others are counted as unsupported_format).
EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff") + (
    (".avif",) if AVIF else ()
)
SUPPORTED = "JPEG, PNG, WebP, GIF, BMP, TIFF" + (" or AVIF" if AVIF else "")
EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = frozenset({5, 6, 7, 8})  # EXIF orientations that rotate by 90 or 270 degrees


class ImageError(ValueError):
    """An image that cannot be used: unreadable, truncated or not an image; names the file."""


class UnsupportedFormatError(ImageError):
    """A readable image in a format difftrain does not train on (ICO, PSD ...); names the file."""


@dataclass(frozen=True)
class DecodedImage:
    """An upright RGB image and the size of the file's full-resolution, upright image.

    ``width``/``height`` are the true dimensions even when ``image`` was reduced on load;
    ``frames`` is above 1 for an animated or multi-page file, of which ``image`` is the first.
    """

    image: Image.Image
    width: int
    height: int
    frames: int = 1


def decode_rgb(data: bytes, name: str, *, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``data`` (one of :data:`FORMATS`) into upright RGB; raise ImageError if unusable.

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
                raise UnsupportedFormatError(
                    f"{name}: {im.format} images are not supported; use {SUPPORTED}"
                )
            # The first frame is the one loaded; an MPO's other frames are previews, not pictures.
            frames = 1 if im.format == "MPO" else int(getattr(im, "n_frames", 1) or 1)
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
        raise ImageError(f"{name}: not a readable image ({SUPPORTED})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports truncated and malformed data as OSError or SyntaxError.
        raise ImageError(f"{name}: corrupt or truncated image ({exc})") from None
    return DecodedImage(rgb, width, height, frames)


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
