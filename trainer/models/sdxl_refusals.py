"""SDXL variants the trainer refuses, with the reason: decided from a single file's tensor shapes.

The loader calls ``refuse_unsupported_sdxl`` on an SGM (A1111/ComfyUI) checkpoint's key -> shape
map before converting it; SDXL base passes, the inpainting UNet and the refiner are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from difftrain.models.errors import ModelError

UNET_INPUT = "model.diffusion_model.input_blocks.0.0.weight"
OPENCLIP_MARKER = "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight"
CLIP_L_MARKER = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"


def refuse_unsupported_sdxl(uri: str, shapes: Mapping[str, Sequence[int]]) -> None:
    """Raise ModelError naming baseModel.uri for an SDXL inpainting model or the SDXL refiner."""
    unet_input = shapes.get(UNET_INPUT)
    if unet_input is not None and len(unet_input) == 4 and unet_input[1] == 9:
        raise ModelError(
            f"baseModel.uri {uri}: an SDXL inpainting checkpoint (the UNet takes 9 input "
            "channels: latents, mask and masked image); training supports text-to-image SDXL "
            "base models with 4 input channels: use an SDXL base checkpoint"
        )
    if OPENCLIP_MARKER in shapes and CLIP_L_MARKER not in shapes:
        raise ModelError(
            f"baseModel.uri {uri}: the SDXL refiner (conditioner.embedders.0 is an OpenCLIP "
            "encoder and there is no CLIP ViT-L; its time ids carry an aesthetic score); "
            "the refiner only denoises the last steps of a base model's image: train an SDXL "
            "base checkpoint instead"
        )
