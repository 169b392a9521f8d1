"""SDXL inpainting and the refiner are refused with errors naming baseModel.uri and the reason."""

from __future__ import annotations

import pytest

from difftrain.models.errors import ModelError
from difftrain.models.sdxl_refusals import (
    CLIP_L_MARKER,
    OPENCLIP_MARKER,
    UNET_INPUT,
    refuse_unsupported_sdxl,
)

BASE = {UNET_INPUT: [320, 4, 3, 3], CLIP_L_MARKER: [49408, 768], OPENCLIP_MARKER: [3840, 1280]}


def test_sdxl_base_shapes_pass() -> None:
    refuse_unsupported_sdxl("s3://m/base.safetensors", BASE)


def test_sdxl_inpainting_unet_is_refused_naming_the_field() -> None:
    with pytest.raises(ModelError, match=r"baseModel\.uri s3://m/inp.*inpainting.*9 input"):
        refuse_unsupported_sdxl("s3://m/inp", {**BASE, UNET_INPUT: [320, 9, 3, 3]})


def test_sdxl_refiner_is_refused_naming_the_field() -> None:
    refiner = {UNET_INPUT: [384, 4, 3, 3], OPENCLIP_MARKER: [3840, 1280]}
    with pytest.raises(ModelError, match=r"baseModel\.uri s3://m/ref.*refiner.*OpenCLIP"):
        refuse_unsupported_sdxl("s3://m/ref", refiner)
