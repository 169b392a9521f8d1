"""SDXL state dicts between diffusers/transformers names and Stability's single-file SGM layout.

The SGM layout is what A1111, ComfyUI and Forge load for SDXL: the UNet under
``model.diffusion_model.`` (with the pooled-text/size conditioning as ``label_emb``), the VAE under
``first_stage_model.``, CLIP-L as a transformers ``CLIPTextModel`` under
``conditioner.embedders.0.transformer.`` and the OpenCLIP ViT-bigG text tower under
``conditioner.embedders.1.model.`` (fused attention projections, ``ln_final`` and a
``text_projection`` matrix applied as ``x @ P``).

No table here: UNet, VAE and both text towers go through :mod:`difftrain.models.ldm`'s SD1/SD2
mappings (SD1's CLIP and SD2's OpenCLIP layouts are SDXL's two encoders under other prefixes). The
inverse maps the target models' own keys forward and looks the SGM tensors up under those names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

import torch

from difftrain.convert import TEXT_ENCODER_LDM_SD1
from difftrain.models.errors import ModelError
from difftrain.models.ldm import (
    OPEN_CLIP_LDM,
    text_from_ldm,
    text_to_ldm,
    unet_from_ldm,
    unet_name_map,
    unet_to_ldm,
    vae_from_ldm,
    vae_name_map,
    vae_to_ldm,
)

Tensors = dict[str, torch.Tensor]
SGM_CLIP_L = "conditioner.embedders.0.transformer."
SGM_OPEN_CLIP = "conditioner.embedders.1.model."
SGM_TEXT_PROJECTION = SGM_OPEN_CLIP + "text_projection"
# CLIPTextModelWithProjection's projection; OpenCLIP keeps it outside the tower, transposed.
TEXT_PROJECTION_KEY = "text_projection.weight"


class SDXLStateDicts(NamedTuple):
    """The four SDXL component state dicts, with diffusers/transformers names."""

    unet: Tensors
    vae: Tensors
    text_encoder: Tensors
    text_encoder_2: Tensors


def _reprefix(state: Mapping[str, torch.Tensor], old: str, new: str) -> Tensors:
    return {new + k[len(old) :]: v for k, v in state.items() if k.startswith(old)}


def _clip_l_to_sgm(state: Mapping[str, torch.Tensor]) -> Tensors:
    return _reprefix(text_to_ldm(state, "sd1"), TEXT_ENCODER_LDM_SD1, SGM_CLIP_L)


def _open_clip_to_sgm(state: Mapping[str, torch.Tensor]) -> Tensors:
    tower = {k: v for k, v in state.items() if k != TEXT_PROJECTION_KEY}
    out = _reprefix(text_to_ldm(tower, "sd2"), OPEN_CLIP_LDM, SGM_OPEN_CLIP)
    if TEXT_PROJECTION_KEY in state:
        out[SGM_TEXT_PROJECTION] = state[TEXT_PROJECTION_KEY].T.contiguous()
    return out


def sdxl_to_sgm(
    unet_state: Mapping[str, torch.Tensor],
    vae_state: Mapping[str, torch.Tensor],
    text_state: Mapping[str, torch.Tensor],
    text_2_state: Mapping[str, torch.Tensor],
) -> Tensors:
    """One SGM-layout state dict from the SDXL UNet, VAE, CLIPTextModel and its projection twin."""
    return {
        **unet_to_ldm(unet_state),
        **vae_to_ldm(vae_state),
        **_clip_l_to_sgm(text_state),
        **_open_clip_to_sgm(text_2_state),
    }


def _sgm_names(
    keys: Iterable[str], forward: Callable[[Mapping[str, torch.Tensor]], Tensors]
) -> set[str]:
    """The SGM keys a text encoder with these keys is written under (shapes do not matter)."""
    placeholder = torch.empty(1, 1, device="meta")
    return set(forward(dict.fromkeys(keys, placeholder)))


def _require(sgm: Mapping[str, torch.Tensor], what: str, names: Iterable[str]) -> None:
    absent = sorted(n for n in names if n not in sgm)
    if absent:
        shown = ", ".join(absent[:3]) + (f" and {len(absent) - 3} more" if len(absent) > 3 else "")
        raise ModelError(
            f"SDXL {what}: the single file lacks {shown}; is it a complete SDXL base checkpoint "
            "in the SGM layout (model.diffusion_model., first_stage_model., "
            "conditioner.embedders.0/1.)?"
        )


def sgm_to_sdxl(
    sgm_state: Mapping[str, torch.Tensor],
    *,
    unet_keys: Iterable[str],
    vae_keys: Iterable[str],
    text_keys: Iterable[str],
    text_2_keys: Iterable[str],
) -> SDXLStateDicts:
    """The SDXL component state dicts (for the target models' keys) from an SGM-layout dict.

    Raises :class:`ModelError` naming the SGM keys the file lacks.
    """
    unet_keys, vae_keys = list(unet_keys), list(vae_keys)
    text_keys = [k for k in text_keys if not k.endswith("position_ids")]
    text_2_keys = [k for k in text_2_keys if not k.endswith("position_ids")]
    _require(sgm_state, "UNet", unet_name_map(unet_keys).values())
    _require(sgm_state, "VAE", (name for name, _ in vae_name_map(vae_keys).values()))
    _require(sgm_state, "text encoder (CLIP-L)", _sgm_names(text_keys, _clip_l_to_sgm))
    _require(sgm_state, "text encoder 2 (OpenCLIP)", _sgm_names(text_2_keys, _open_clip_to_sgm))

    clip_l = _reprefix(sgm_state, SGM_CLIP_L, TEXT_ENCODER_LDM_SD1)
    open_clip = _reprefix(sgm_state, SGM_OPEN_CLIP, OPEN_CLIP_LDM)
    tower_keys = [k for k in text_2_keys if k != TEXT_PROJECTION_KEY]
    text_2 = text_from_ldm(open_clip, "sd2", tower_keys)
    if TEXT_PROJECTION_KEY in text_2_keys:
        text_2[TEXT_PROJECTION_KEY] = sgm_state[SGM_TEXT_PROJECTION].T.contiguous()
    return SDXLStateDicts(
        unet=unet_from_ldm(sgm_state, unet_keys),
        vae=vae_from_ldm(sgm_state, vae_keys),
        text_encoder=text_from_ldm(clip_l, "sd1", text_keys),
        text_encoder_2=text_2,
    )
