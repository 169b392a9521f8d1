"""Key-layout conversions between diffusers names and the original LDM single-file layout.

The single-file layout is what AUTOMATIC1111, ComfyUI and Forge load: one state dict with the UNet
under ``model.diffusion_model.``, the VAE under ``first_stage_model.`` and the CLIP text encoder
under ``cond_stage_model.transformer.`` (SD1). Names are computed from the model's structure, so the
same code serves SD-sized models and tiny test models built from configs.
"""

from __future__ import annotations

import re

from difftrain.merge.arch import UNET_LDM, UNetLayout, diffusers_unet_module_to_ldm

VAE_LDM = "first_stage_model."
TEXT_ENCODER_LDM_SD1 = "cond_stage_model.transformer."


def unet_layout_from_diffusers(keys: set[str]) -> tuple[UNetLayout, set[int]]:
    """Levels, resnets per level and the up levels with attentions, from diffusers UNet keys."""
    levels = {int(m.group(1)) for k in keys if (m := re.match(r"down_blocks\.(\d+)\.", k))}
    resnets = {
        int(m.group(1)) for k in keys if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))
    }
    if not levels or not resnets:
        raise ValueError("not an SD-style diffusers UNet: no down_blocks.N.resnets keys")
    attn_up = {
        int(m.group(1)) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))
    }
    return UNetLayout(levels=len(levels), layers=len(resnets)), attn_up


def unet_key_to_ldm(key: str, unet: UNetLayout, attn_up: set[int]) -> str:
    """A diffusers UNet key in the LDM layout.

    ``down_blocks.0.resnets.0.conv1.weight`` becomes
    ``model.diffusion_model.input_blocks.1.0.in_layers.2.weight``.
    """
    module, _, param = key.rpartition(".")
    ldm = diffusers_unet_module_to_ldm(module, unet, attn_up)
    if ldm is None:
        raise ValueError(f"no LDM name for UNet key {key!r}")
    return f"{UNET_LDM}{ldm}.{param}"


_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key_to_ldm(key: str, up_levels: int) -> tuple[str, bool]:
    """A diffusers VAE key in the LDM layout, and whether its weight becomes a 1x1 convolution."""

    def resnet_part(part: str) -> str:
        head, _, tail = part.partition(".")
        return f"{_VAE_RESNET.get(head, head)}.{tail}"

    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", key):
        side, module, param = m.groups()
        name = _VAE_ATTN.get(module)
        if name is None:
            raise ValueError(f"no LDM name for VAE key {key!r}")
        return f"{VAE_LDM}{side}.mid.attn_1.{name}.{param}", name != "norm" and param == "weight"
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)$", key):
        side, k, rest = m.groups()
        return f"{VAE_LDM}{side}.mid.block_{int(k) + 1}.{resnet_part(rest)}", False
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", key):
        i, j, rest = m.groups()
        return f"{VAE_LDM}encoder.down.{i}.block.{j}.{resnet_part(rest)}", False
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)$", key):
        return f"{VAE_LDM}encoder.down.{m.group(1)}.downsample.conv.{m.group(2)}", False
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", key):
        i, j, rest = m.groups()
        level = up_levels - 1 - int(i)
        return f"{VAE_LDM}decoder.up.{level}.block.{j}.{resnet_part(rest)}", False
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)$", key):
        level = up_levels - 1 - int(m.group(1))
        return f"{VAE_LDM}decoder.up.{level}.upsample.conv.{m.group(2)}", False
    if m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.+)$", key):
        return f"{VAE_LDM}{m.group(1)}.norm_out.{m.group(2)}", False
    if re.match(r"(encoder|decoder)\.(conv_in|conv_out)\.", key) or key.startswith(
        ("quant_conv.", "post_quant_conv.")
    ):
        return VAE_LDM + key, False
    raise ValueError(f"no LDM name for VAE key {key!r}")


def vae_up_levels(keys: set[str]) -> int:
    """Number of decoder up levels of a diffusers VAE."""
    return len({m.group(1) for k in keys if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))})


def text_encoder_key_to_ldm_sd1(key: str) -> str:
    """CLIP text model keys (transformers names) under SD1's ``cond_stage_model.transformer.``.

    SD1 files name them ``text_model.encoder...`` (transformers 4's state-dict names); transformers
    5 drops the ``text_model.`` level, so it is put back.
    """
    if not key.startswith("text_model."):
        key = "text_model." + key
    return TEXT_ENCODER_LDM_SD1 + key
