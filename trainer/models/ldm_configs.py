"""diffusers/transformers configs for the networks in an LDM single file, from its tensor shapes.

Shapes fix channels, levels, layers, attention placement, projection kind and vocabulary; they do
not fix attention head counts, normalisation group counts or activation functions. Those take the
values of the Stable Diffusion releases (SD1: 8 heads; SD2: 64-wide heads; 32 groups; CLIP-L's
quick-GELU, OpenCLIP's GELU). Files this package exports record their exact configs in the
safetensors metadata (``difftrain.config.*``), which take precedence, so any model it trained, tiny
ones included, loads back exactly.
"""

from __future__ import annotations

import math
import re
from typing import Any

from difftrain.merge.arch import UNET_LDM, unet_layout
from difftrain.models.errors import ModelError
from difftrain.models.ldm import OPEN_CLIP_LDM

Shapes = dict[str, tuple[int, ...]]

# SD1's and SD2's training schedule; a single file records none.
SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}
SD_VAE_SCALING = 0.18215
# SDXL base's schedule (its EulerDiscreteScheduler) and its VAE's latent scale
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "use_karras_sigmas": False,
}
SDXL_VAE_SCALING = 0.13025
SDXL_CLIP_L = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP = "conditioner.embedders.1.model."
SDXL_TEXT_PROJECTION = SDXL_OPEN_CLIP + "text_projection"
# CLIP's BPE vocabulary: start- and end-of-text are its last two tokens.
CLIP_BOS, CLIP_EOS = 49406, 49407


def _shape(shapes: Shapes, key: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ModelError(f"{what}: the checkpoint lacks {key}; is it a complete SD1/SD2 file?")
    return shapes[key]


def _groups(channels: list[int]) -> int:
    """SD's 32 normalisation groups, or fewer where the channels do not divide into 32."""
    return math.gcd(32, *channels)


def unet_config(shapes: Shapes, family: str) -> dict[str, Any]:
    """UNet2DConditionModel config of an SD1/SD2/SDXL UNet under ``model.diffusion_model.``."""
    keys = set(shapes)
    layout = unet_layout(keys, "ldm")
    per = layout.layers + 1
    u = UNET_LDM
    channels = [
        _shape(shapes, f"{u}input_blocks.{1 + i * per}.0.out_layers.3.weight", "UNet")[0]
        for i in range(layout.levels)
    ]
    down_attn = [
        any(k.startswith(f"{u}input_blocks.{1 + i * per}.1.") for k in keys)
        for i in range(layout.levels)
    ]
    up_attn = [f"{u}output_blocks.{i * per}.1.proj_in.weight" in keys for i in range(layout.levels)]
    proj_in = next((shapes[k] for k in sorted(keys) if k.endswith(".proj_in.weight")), None)
    to_k = next(
        (shapes[k] for k in sorted(keys) if k.endswith("transformer_blocks.0.attn2.to_k.weight")),
        None,
    )
    if proj_in is None or to_k is None:
        raise ModelError("UNet: no cross-attention found; not an SD1/SD2 text-to-image UNet")
    depth = [
        len(
            {
                m.group(1)
                for k in keys
                if (
                    m := re.match(
                        re.escape(f"{u}input_blocks.{1 + i * per}.1.transformer_blocks.")
                        + r"(\d+)\.",
                        k,
                    )
                )
            }
        )
        or 1
        for i in range(layout.levels)
    ]
    heads: int | list[int] = 8 if family == "sd1" else [max(1, c // 64) for c in channels]
    added: dict[str, Any] = {}
    if family == "sdxl":
        # label_emb takes the pooled text embedding and six embedded time ids
        label = _shape(shapes, f"{u}label_emb.0.0.weight", "UNet")
        pooled = _shape(shapes, SDXL_TEXT_PROJECTION, "text encoder 2")[1]
        added = {
            "addition_embed_type": "text_time",
            "projection_class_embeddings_input_dim": label[1],
            "addition_time_embed_dim": (label[1] - pooled) // 6,
        }
    return {
        "sample_size": {"sd1": 64, "sd2": 96}.get(family, 128),
        "in_channels": _shape(shapes, f"{u}input_blocks.0.0.weight", "UNet")[1],
        "out_channels": _shape(shapes, f"{u}out.2.weight", "UNet")[0],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        "block_out_channels": channels,
        "layers_per_block": layout.layers,
        "cross_attention_dim": to_k[1],
        "attention_head_dim": heads,
        "use_linear_projection": len(proj_in) == 2,
        "transformer_layers_per_block": depth if len(set(depth)) > 1 else depth[0],
        "norm_num_groups": _groups(channels),
        **added,
    }


def vae_config(shapes: Shapes) -> dict[str, Any]:
    """AutoencoderKL config of the VAE under ``first_stage_model.``."""
    v = "first_stage_model."
    levels = sorted(
        {int(m.group(1)) for k in shapes if (m := re.match(rf"{v}encoder\.down\.(\d+)\.", k))}
    )
    if not levels:
        raise ModelError("VAE: the checkpoint has no first_stage_model.encoder.down blocks")
    blocks = {
        m.group(1) for k in shapes if (m := re.match(rf"{v}encoder\.down\.0\.block\.(\d+)\.", k))
    }
    channels = [
        _shape(shapes, f"{v}encoder.down.{i}.block.0.conv1.weight", "VAE")[0] for i in levels
    ]
    return {
        "in_channels": _shape(shapes, f"{v}encoder.conv_in.weight", "VAE")[1],
        "out_channels": _shape(shapes, f"{v}decoder.conv_out.weight", "VAE")[0],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": channels,
        "norm_num_groups": _groups(channels),
        "layers_per_block": len(blocks),
        "latent_channels": _shape(shapes, f"{v}quant_conv.weight", "VAE")[0] // 2,
        "sample_size": 512,
        "scaling_factor": SD_VAE_SCALING,
    }


def text_config(shapes: Shapes, family: str) -> dict[str, Any]:
    """CLIPTextConfig keywords for the family's text encoder."""
    if family == "sd2":
        p = OPEN_CLIP_LDM
        vocab, width = _shape(shapes, f"{p}token_embedding.weight", "text encoder")
        positions = _shape(shapes, f"{p}positional_embedding", "text encoder")[0]
        blocks = {
            m.group(1) for k in shapes if (m := re.match(rf"{p}transformer\.resblocks\.(\d+)\.", k))
        }
        mlp = _shape(shapes, f"{p}transformer.resblocks.0.mlp.c_fc.weight", "text encoder")[0]
        # SD2 conditions on the penultimate block: the last one is not part of the model
        layers = max(1, len(blocks) - 1)
        act = "gelu"
    else:
        p = "cond_stage_model.transformer."
        prefix = p + "text_model." if f"{p}text_model.final_layer_norm.weight" in shapes else p
        vocab, width = _shape(shapes, f"{prefix}embeddings.token_embedding.weight", "text encoder")
        positions = _shape(shapes, f"{prefix}embeddings.position_embedding.weight", "text encoder")[
            0
        ]
        blocks = {
            m.group(1) for k in shapes if (m := re.match(rf"{prefix}encoder\.layers\.(\d+)\.", k))
        }
        mlp = _shape(shapes, f"{prefix}encoder.layers.0.mlp.fc1.weight", "text encoder")[0]
        layers = len(blocks)
        act = "quick_gelu"
    return {
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": mlp,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, width // 64),
        "max_position_embeddings": positions,
        "hidden_act": act,
        "projection_dim": width,
        "bos_token_id": CLIP_BOS,
        "eos_token_id": CLIP_EOS,
        "pad_token_id": CLIP_EOS if family == "sd1" else 0,
    }


def _reprefixed(shapes: Shapes, old: str, new: str) -> Shapes:
    return {new + k[len(old) :]: v for k, v in shapes.items() if k.startswith(old)}


def sdxl_text_configs(shapes: Shapes) -> tuple[dict[str, Any], dict[str, Any]]:
    """CLIPTextConfig keywords of SDXL's CLIP ViT-L and of its OpenCLIP bigG (every block of
    which the model keeps: SDXL conditions on the penultimate hidden state at run time)."""
    clip_l = text_config(_reprefixed(shapes, SDXL_CLIP_L, "cond_stage_model.transformer."), "sd1")
    open_clip = _reprefixed(shapes, SDXL_OPEN_CLIP, OPEN_CLIP_LDM)
    big_g = text_config(open_clip, "sd2")
    blocks = {
        m.group(1)
        for k in open_clip
        if (m := re.match(rf"{re.escape(OPEN_CLIP_LDM)}transformer\.resblocks\.(\d+)\.", k))
    }
    big_g["num_hidden_layers"] = len(blocks)
    big_g["projection_dim"] = _shape(shapes, SDXL_TEXT_PROJECTION, "text encoder 2")[1]
    return clip_l, big_g
