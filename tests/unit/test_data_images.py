"""Decoding: every supported file comes out upright and RGB; unusable ones are named."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from difftrain.data.images import AVIF, ImageError, UnsupportedFormatError, decode, decode_rgb
from tests.datasets import encode, jpeg, synthetic_image


def _two_halves(width: int, height: int) -> Image.Image:
    """Top half red, bottom half blue."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[: height // 2, :, 0] = 255
    arr[height // 2 :, :, 2] = 255
    return Image.fromarray(arr)


def _with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", exif=exif.tobytes())


def test_exif_rotated_jpeg_comes_out_upright():
    # Stored 160x96 with the red half on top; orientation 6 means "rotate 90° clockwise to view".
    data = _with_orientation(_two_halves(160, 96), 6)
    image = decode_rgb(data, "phone.jpg")
    assert image.size == (96, 160)
    left, right = np.asarray(image)[80, 5], np.asarray(image)[80, 90]
    assert left[2] > 200 and left[0] < 60  # blue on the left
    assert right[0] > 200 and right[2] < 60  # red on the right


def test_draft_decodes_smaller_but_still_covers_and_reports_the_true_size():
    data = jpeg(1, (768, 640))
    full = decode(data, "a.jpg")
    small = decode(data, "a.jpg", draft=(100, 100))
    assert full.image.size == (768, 640)
    assert small.image.size[0] < 768 and min(small.image.size) >= 100
    assert (small.width, small.height) == (768, 640)


def test_draft_respects_orientation():
    # Stored 800x200 (landscape), shown 200x800: the requested cover is in upright terms.
    data = _with_orientation(synthetic_image(2, (800, 200)), 8)
    out = decode(data, "tall.jpg", draft=(50, 300))
    assert (out.width, out.height) == (200, 800)
    # 1/2 scale covers 50x300 upright (100x400); read without the rotation it would not (400x100)
    assert out.image.size == (100, 400)


def test_palette_with_transparency_is_composited_on_white():
    image = Image.new("P", (64, 64), 0)
    image.putpalette([0, 0, 0] * 256)
    image.info["transparency"] = 0
    rgb = decode_rgb(encode(image, "PNG", transparency=0), "p.png")
    assert rgb.mode == "RGB"
    assert np.asarray(rgb).min() == 255  # fully transparent black becomes white


def test_alpha_is_composited_on_white():
    arr = np.zeros((32, 32, 4), np.uint8)
    arr[..., 0] = 255  # red
    arr[:, :16, 3] = 255  # left half opaque, right half transparent
    rgb = np.asarray(decode_rgb(encode(Image.fromarray(arr, "RGBA"), "PNG"), "a.png"))
    assert tuple(rgb[10, 5]) == (255, 0, 0)
    assert tuple(rgb[10, 25]) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["L", "LA", "1", "CMYK"])
def test_grey_bilevel_and_cmyk_become_rgb(mode):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    data = encode(synthetic_image(3, (48, 40), mode=mode), fmt)
    image = decode_rgb(data, f"x.{fmt.lower()}")
    assert image.mode == "RGB" and image.size == (48, 40)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    arr = np.full((16, 16), 32768, np.uint16)  # mid-grey in 16 bits
    data = encode(Image.fromarray(arr), "PNG")
    value = np.asarray(decode_rgb(data, "deep.png"))[0, 0]
    assert 120 <= value[0] <= 135


def test_webp_is_supported():
    image = decode_rgb(encode(synthetic_image(4, (64, 48)), "WEBP", quality=90), "w.webp")
    assert image.size == (64, 48) and image.mode == "RGB"


def test_truncated_jpeg_is_an_image_error_naming_the_file():
    data = jpeg(5, (128, 128))
    with pytest.raises(ImageError, match=r"cut\.jpg: corrupt or truncated"):
        decode_rgb(data[: len(data) // 2], "cut.jpg")


def test_text_file_named_jpg_is_an_image_error():
    with pytest.raises(ImageError, match=r"notes\.jpg: not a readable image"):
        decode_rgb(b"hello, I am text\n", "notes.jpg")


def test_other_formats_are_refused_by_name():
    with pytest.raises(UnsupportedFormatError, match=r"icon\.png: ICO images are not supported"):
        decode_rgb(encode(synthetic_image(6, (16, 16)), "ICO"), "icon.png")


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [("GIF", "RGB"), ("BMP", "RGB"), ("TIFF", "RGB"), ("TIFF", "CMYK"), ("AVIF", "RGB")],
)
def test_gif_bmp_tiff_and_avif_are_decoded(fmt, mode):
    if fmt == "AVIF" and not AVIF:
        pytest.skip("this Pillow has no AVIF support")
    image = synthetic_image(7, (48, 40), mode)
    out = decode(encode(image, fmt), f"x.{fmt.lower()}")
    assert (out.width, out.height, out.frames, out.image.mode) == (48, 40, 1, "RGB")
    expected = np.asarray(image.convert("RGB"), np.float64)
    tolerance = 12 if fmt in ("GIF", "AVIF") else 1  # GIF: a 256-colour palette; AVIF: lossy
    assert np.abs(np.asarray(out.image, np.float64) - expected).mean() < tolerance


def test_an_animated_gif_gives_its_first_frame_and_counts_the_frames():
    frames = [Image.new("RGB", (32, 24), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    out = decode(buf.getvalue(), "anim.gif")
    assert out.frames == 3
    assert out.image.getpixel((5, 5)) == (255, 0, 0)
