"""What a checkpoint is, read from its key names and shapes alone (the safetensors header).

- layout: ``ldm`` (one file in the original key layout, as A1111/ComfyUI load it), ``diffusers``
  (component state dicts with diffusers names), ``lora_kohya`` or ``lora_peft``;
- family: ``sd1``, ``sd2``, ``sdxl`` (or ``unknown``), from the text encoders and the UNet's
  structure rather than from sizes, so tiny test models are recognised like real ones;
- variant: ``inpainting`` when the UNet's ``conv_in`` takes 9 channels; prediction type where the
  file records it (a ``v_pred`` key or ``modelspec.prediction_type`` metadata).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from difftrain.merge.tensorio import Header

UNET_LDM = "model.diffusion_model."
VAE_LDM = "first_stage_model."
LDM_COMPONENT_PREFIXES = {
    "unet": (UNET_LDM,),
    "vae": (VAE_LDM,),
    "text_encoder": ("cond_stage_model.", "conditioner.embedders.0."),
    "text_encoder_2": ("conditioner.embedders.1.",),
}


@dataclass(frozen=True)
class ModelInfo:
    """What :func:`describe` found out about one input."""

    layout: str
    family: str
    in_channels: int | None
    prediction: str
    components: tuple[str, ...]

    @property
    def variant(self) -> str:
        return "inpainting" if self.in_channels == 9 else "normal"

    def label(self) -> str:
        """Short human description, e.g. 'SD1.x inpainting (LDM single file)'."""
        family = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}.get(self.family, "unknown")
        variant = " inpainting" if self.variant == "inpainting" else ""
        pred = " v-prediction" if self.prediction == "v_prediction" else ""
        return f"{family}{variant}{pred} ({self.layout})"


def is_lora(keys: set[str]) -> str | None:
    """'lora_kohya', 'lora_peft' or None."""
    if any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys):
        return "lora_kohya"
    if any(".lora_A." in k or ".lora_B." in k or ".lora.down." in k for k in keys):
        return "lora_peft"
    return None


def component_of(key: str, layout: str) -> str:
    """The component of a key: unet, text_encoder, text_encoder_2, vae or other."""
    if layout == "ldm":
        for component, prefixes in LDM_COMPONENT_PREFIXES.items():
            if key.startswith(prefixes):
                return component
        return "other"
    head = key.split(".", 1)[0]
    return head if head in {"unet", "text_encoder", "text_encoder_2", "vae"} else "unet"


def describe(header: Header, component_hint: str | None = None) -> ModelInfo:
    """Detect layout, family, conv_in channels and prediction type of one safetensors file.

    ``component_hint`` names the component of a file from a diffusers folder (its sub-folder).
    """
    keys = set(header.tensors)
    lora = is_lora(keys)
    meta = header.metadata
    prediction = "unknown"
    if "v_pred" in keys or meta.get("modelspec.prediction_type", "").startswith("v"):
        prediction = "v_prediction"
    elif meta.get("modelspec.prediction_type") == "epsilon":
        prediction = "epsilon"
    if lora:
        family = (
            "sdxl"
            if any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in keys)
            else ("unknown")
        )
        return ModelInfo(lora, family, None, prediction, ())

    if any(k.startswith(UNET_LDM) for k in keys):
        layout = "ldm"
        conv_in = header.tensors.get(f"{UNET_LDM}input_blocks.0.0.weight")
        in_channels = conv_in.shape[1] if conv_in else None
        if any(k.startswith("conditioner.embedders.1.") for k in keys) or (
            f"{UNET_LDM}label_emb.0.0.weight" in keys
        ):
            family = "sdxl"
        elif any(k.startswith("cond_stage_model.model.") for k in keys):
            family = "sd2"
        elif any(k.startswith("cond_stage_model.transformer.") for k in keys):
            family = "sd1"
        else:
            family = _family_from_unet(header, UNET_LDM + "input_blocks.1.1.proj_in.weight")
        components = tuple(
            c
            for c, prefixes in LDM_COMPONENT_PREFIXES.items()
            if any(k.startswith(prefixes) for k in keys)
        )
        return ModelInfo(layout, family, in_channels, prediction, components)

    # diffusers names (one component file of a diffusers folder, or a bare UNet state dict)
    component = component_hint or "unet"
    in_channels = None
    family = "unknown"
    if "conv_in.weight" in keys and "time_embedding.linear_1.weight" in keys:
        in_channels = header.tensors["conv_in.weight"].shape[1]
        if "add_embedding.linear_1.weight" in keys:
            family = "sdxl"
        else:
            family = _family_from_unet(header, "down_blocks.0.attentions.0.proj_in.weight")
    return ModelInfo("diffusers", family, in_channels, prediction, (component,))


def _family_from_unet(header: Header, proj_in_key: str) -> str:
    """SD1 UNets use 1x1 convolutions for proj_in, SD2 uses linear layers."""
    info = header.tensors.get(proj_in_key)
    if info is None:
        return "unknown"
    return "sd1" if len(info.shape) == 4 else "sd2"


# --------------------------------------------------------------------------------------------
# UNet blocks: block weights and diffusers <-> LDM module names
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UNetLayout:
    """Block structure of an SD-style UNet: levels and resnets per down level."""

    levels: int
    layers: int

    @property
    def blocks(self) -> int:
        """Input blocks + middle + output blocks (25 for SD1/SD2, 19 for SDXL)."""
        return 2 * self.levels * (self.layers + 1) + 1

    def block_names(self) -> list[str]:
        n = self.levels * (self.layers + 1)
        return [f"IN{i:02d}" for i in range(n)] + ["M00"] + [f"OUT{i:02d}" for i in range(n)]


def unet_layout(keys: set[str], layout: str) -> UNetLayout:
    """Infer levels and layers per level from the UNet's keys."""
    if layout == "ldm":
        inputs = {
            int(m.group(1))
            for k in keys
            if (m := re.match(r"model\.diffusion_model\.input_blocks\.(\d+)\.", k))
        }
        downsamplers = {
            k
            for k in keys
            if re.match(r"model\.diffusion_model\.input_blocks\.\d+\.0\.op\.weight", k)
        }
    else:
        inputs = set()
        levels = {
            int(m.group(1)) for k in keys if (m := re.match(r"(?:unet\.)?down_blocks\.(\d+)\.", k))
        }
        resnets = {
            int(m.group(1))
            for k in keys
            if (m := re.match(r"(?:unet\.)?down_blocks\.0\.resnets\.(\d+)\.", k))
        }
        if not levels or not resnets:
            raise ValueError("no UNet down blocks found: not an SD-style UNet")
        return UNetLayout(levels=len(levels), layers=len(resnets))
    if not inputs:
        raise ValueError("no UNet input blocks found: not an SD-style UNet")
    n_levels = len(downsamplers) + 1
    return UNetLayout(levels=n_levels, layers=(max(inputs) + 1) // n_levels - 1)


def block_index(key: str, layout: str, unet: UNetLayout) -> int | None:
    """Index into ``UNetLayout.block_names()`` of a UNet key, or None (time embedding, out)."""
    per = unet.layers + 1
    n_in = unet.levels * per
    if layout == "ldm":
        if m := re.match(r"model\.diffusion_model\.input_blocks\.(\d+)\.", key):
            return int(m.group(1))
        if key.startswith("model.diffusion_model.middle_block."):
            return n_in
        if m := re.match(r"model\.diffusion_model\.output_blocks\.(\d+)\.", key):
            return n_in + 1 + int(m.group(1))
        return None
    key = key.removeprefix("unet.")
    if key.startswith("conv_in."):
        return 0
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.", key):
        return 1 + int(m.group(1)) * per + int(m.group(3))
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.", key):
        return (int(m.group(1)) + 1) * per
    if key.startswith("mid_block."):
        return n_in
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.", key):
        return n_in + 1 + int(m.group(1)) * per + int(m.group(3))
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.", key):
        return n_in + 1 + int(m.group(1)) * per + unet.layers
    return None


_RESNET_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP_LDM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def diffusers_unet_module_to_ldm(path: str, unet: UNetLayout, attn_up: set[int]) -> str | None:
    """An LDM module path (without ``model.diffusion_model.``) for a diffusers UNet module path.

    ``attn_up`` lists the up levels that have attentions (their upsampler sits at index 2).
    """
    per = unet.layers + 1
    for src, dst in _TOP_LDM.items():
        if path == src or path.startswith(src + "."):
            return dst + path[len(src) :]

    def resnet(rest: str) -> str:
        head, _, tail = rest.partition(".")
        return _RESNET_LDM.get(head, head) + (f".{tail}" if tail else "")

    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", path):
        i, j = int(m.group(1)), int(m.group(2))
        return f"input_blocks.{1 + i * per + j}.0.{resnet(m.group(3))}"
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", path):
        i, j = int(m.group(1)), int(m.group(2))
        return f"input_blocks.{1 + i * per + j}.1.{m.group(3)}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv(.*)", path):
        return f"input_blocks.{(int(m.group(1)) + 1) * per}.0.op{m.group(2)}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", path):
        return f"middle_block.{2 * int(m.group(1))}.{resnet(m.group(2))}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)", path):
        return f"middle_block.1.{m.group(1)}"
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", path):
        i, j = int(m.group(1)), int(m.group(2))
        return f"output_blocks.{i * per + j}.0.{resnet(m.group(3))}"
    if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", path):
        i, j = int(m.group(1)), int(m.group(2))
        return f"output_blocks.{i * per + j}.1.{m.group(3)}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv(.*)", path):
        i = int(m.group(1))
        slot = 2 if i in attn_up else 1
        return f"output_blocks.{i * per + unet.layers}.{slot}.conv{m.group(2)}"
    return None
