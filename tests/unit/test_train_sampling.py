"""Samples made during training: the ControlNet's conditioning scale is the one the spec gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from difftrain.api import SamplingSpec
from difftrain.models.tiny import build_tiny_components
from difftrain.train.sampling import build_pipeline, generate

PROMPTS = ["a red circle on a blue background", "a green square on a white background"]


@pytest.fixture(scope="module")
def parts():
    from diffusers import ControlNetModel

    torch.manual_seed(0)
    components = build_tiny_components(seed=0)
    levels = len(components.vae.config.block_out_channels) - 1  # as the controlnet method does
    controlnet = ControlNetModel.from_unet(
        components.unet, conditioning_embedding_out_channels=(16, 32, 96, 256)[: levels + 1]
    )
    # a trained ControlNet: its zero convolutions are zero no more, so its residuals count
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if "zero_conv" in name or "mid_block" in name:
                param.add_(torch.randn_like(param) * 0.05)
    return components, controlnet


def _images(components, controlnet, scale: float | None) -> np.ndarray:
    spec = SamplingSpec.model_validate({"numInferenceSteps": 3, "seed": 7})
    cond = [Image.new("RGB", (64, 64), (255, 255, 255)), Image.new("RGB", (64, 64), (0, 0, 0))]
    pipe = build_pipeline(components, components.unet, controlnet=controlnet)
    images = generate(
        pipe,
        spec,
        PROMPTS,
        resolution=64,
        device=torch.device("cpu"),
        conditioning=cond if controlnet is not None else None,
        conditioning_scale=1.0 if scale is None else scale,
    )
    return np.stack([np.asarray(i, dtype=np.int16) for i in images])


def test_conditioning_scale_zero_samples_the_unet_alone(parts):
    components, controlnet = parts
    plain = _images(components, None, None)
    assert np.abs(_images(components, controlnet, 0.0) - plain).max() <= 2


def test_the_conditioning_scale_changes_the_samples_in_proportion(parts):
    components, controlnet = parts
    plain = _images(components, None, None)
    small = np.abs(_images(components, controlnet, 0.1) - plain).mean()
    full = np.abs(_images(components, controlnet, 1.0) - plain).mean()
    assert full > 1.0  # the ControlNet's residuals reach the samples
    assert small < full / 2  # a tenth of the scale moves them much less
