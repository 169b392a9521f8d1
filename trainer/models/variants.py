"""Which base models training takes: text-to-image UNets, refused by name otherwise.

An inpainting, image-editing, depth or upscaling UNet takes more input channels than the 4 latent
ones, and training it as text-to-image ends in a shape error deep in the first step; these checks
run on a config or a file header, before any weight is downloaded.
"""

from __future__ import annotations

from typing import Any

from difftrain.models.errors import ModelError

# UNets that are not text-to-image: what their extra input channels carry
_UNET_VARIANTS = {
    9: "an inpainting model (its UNet takes 9 input channels: the noisy latents, a mask and "
    "the masked image)",
    8: "an image-editing model such as InstructPix2Pix (its UNet takes 8 input channels: the "
    "noisy latents and the source image's)",
    5: "a depth-to-image model (its UNet takes 5 input channels: the noisy latents and a depth "
    "map)",
    7: "an upscaler (its UNet takes 7 input channels: the noisy latents and the low-resolution "
    "image)",
}


def refuse_unsupported_unet(
    in_channels: int, out_channels: int, where: str, *, class_embeddings: bool = False
) -> None:
    """Refuse UNets other than text-to-image ones (4 latent channels in and out), by name."""
    if in_channels == 4 and out_channels == 4 and not class_embeddings:
        return
    what = _UNET_VARIANTS.get(
        in_channels,
        f"a UNet with {in_channels} input and {out_channels} output channels"
        + (" and class embeddings" if class_embeddings else ""),
    )
    raise ModelError(
        f"{where}: {what}; training supports text-to-image SD1.x, SD2.x and SDXL base models (4 "
        "latent channels in and out) for now: use the model's text-to-image release"
    )


def check_unet_config(config: dict[str, Any], where: str) -> None:
    """``refuse_unsupported_unet`` for a diffusers ``unet/config.json``."""
    refuse_unsupported_unet(
        int(config.get("in_channels", 4)),
        int(config.get("out_channels", 4)),
        where,
        class_embeddings=bool(config.get("num_class_embeds") or config.get("class_embed_type")),
    )
