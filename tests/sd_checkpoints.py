"""Synthetic Stable Diffusion checkpoints with the real key names and shapes, built from configs.

The models are instantiated on the meta device (no memory, no download) to read their state-dict
names and shapes, which are converted to the LDM single-file layout; ``write_checkpoint`` then
fills them with seeded random data tensor by tensor, so even a 2 GB file never sits in memory.
Used by the merge tests and ``benchmarks/merge_bench.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from difftrain.convert import (
    text_encoder_key_to_ldm_sd1,
    unet_key_to_ldm,
    unet_layout_from_diffusers,
    vae_key_to_ldm,
    vae_up_levels,
)
from difftrain.merge.tensorio import CODES, OutputTensor, StreamingWriter
from difftrain.models.tiny import TINY_UNET_CONFIG, TINY_VAE_CONFIG

Shapes = dict[str, tuple[tuple[int, ...], torch.dtype]]

SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD2_UNET = {
    **SD15_UNET,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
}
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
SD_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
}
CLIP_L: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
}

# The package's tiny model, with the small latent size and norm groups of these fixtures.
TINY_UNET: dict[str, Any] = {**TINY_UNET_CONFIG, "sample_size": 8, "norm_num_groups": 8}
TINY_VAE: dict[str, Any] = {k: v for k, v in TINY_VAE_CONFIG.items() if k != "sample_size"}
TINY_CLIP: dict[str, Any] = {
    "vocab_size": 1000,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "projection_dim": 32,
}


def _meta_state(factory: Any) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = factory()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def unet_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    from diffusers import UNet2DConditionModel

    return _meta_state(lambda: UNet2DConditionModel(**config))


def vae_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    from diffusers import AutoencoderKL

    return _meta_state(lambda: AutoencoderKL(**config))


def clip_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    from transformers import CLIPTextConfig, CLIPTextModel

    return _meta_state(lambda: CLIPTextModel(CLIPTextConfig(**config)))


def open_clip_shapes(prefix: str, width: int, layers: int, mlp: int) -> dict[str, tuple[int, ...]]:
    """The OpenCLIP text tower as SD2 and SDXL store it (fused in_proj attention weights)."""
    out: dict[str, tuple[int, ...]] = {
        f"{prefix}positional_embedding": (77, width),
        f"{prefix}token_embedding.weight": (49408, width),
        f"{prefix}ln_final.weight": (width,),
        f"{prefix}ln_final.bias": (width,),
        f"{prefix}text_projection": (width, width),
        f"{prefix}logit_scale": (),
    }
    for i in range(layers):
        block = f"{prefix}transformer.resblocks.{i}."
        out.update(
            {
                f"{block}ln_1.weight": (width,),
                f"{block}ln_1.bias": (width,),
                f"{block}attn.in_proj_weight": (3 * width, width),
                f"{block}attn.in_proj_bias": (3 * width,),
                f"{block}attn.out_proj.weight": (width, width),
                f"{block}attn.out_proj.bias": (width,),
                f"{block}ln_2.weight": (width,),
                f"{block}ln_2.bias": (width,),
                f"{block}mlp.c_fc.weight": (mlp, width),
                f"{block}mlp.c_fc.bias": (mlp,),
                f"{block}mlp.c_proj.weight": (width, mlp),
                f"{block}mlp.c_proj.bias": (width,),
            }
        )
    return out


def ldm_unet(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    shapes = unet_shapes(config)
    layout, attn_up = unet_layout_from_diffusers(set(shapes))
    return {unet_key_to_ldm(k, layout, attn_up): s for k, s in shapes.items()}


def ldm_vae(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    shapes = vae_shapes(config)
    levels = vae_up_levels(set(shapes))
    out = {}
    for key, shape in shapes.items():
        ldm, conv = vae_key_to_ldm(key, levels)
        out[ldm] = (*shape, 1, 1) if conv else shape
    return out


def checkpoint_shapes(family: str, in_channels: int = 4, tiny: bool = False) -> Shapes:
    """LDM single-file key -> (shape, dtype) of an SD1, SD2 or SDXL checkpoint."""
    half = torch.float16
    if family == "sd1":
        unet = {**(TINY_UNET if tiny else SD15_UNET), "in_channels": in_channels}
        text = {
            text_encoder_key_to_ldm_sd1(k): s
            for k, s in clip_shapes(TINY_CLIP if tiny else CLIP_L).items()
        }
        text["cond_stage_model.transformer.text_model.embeddings.position_ids"] = (1, 77)
    elif family == "sd2":
        unet = {**(TINY_UNET if tiny else SD2_UNET), "in_channels": in_channels}
        if tiny:
            unet["use_linear_projection"] = True
        width = 32 if tiny else 1024
        text = open_clip_shapes("cond_stage_model.model.", width, 2 if tiny else 24, 4 * width)
    elif family == "sdxl":
        unet = {**SDXL_UNET, "in_channels": in_channels}
        text = {
            "conditioner.embedders.0.transformer." + k: s for k, s in clip_shapes(CLIP_L).items()
        }
        text.update(open_clip_shapes("conditioner.embedders.1.model.", 1280, 32, 5120))
    else:
        raise ValueError(family)
    shapes: Shapes = {}
    for key, shape in {**ldm_unet(unet), **ldm_vae(TINY_VAE if tiny else SD_VAE), **text}.items():
        dtype = torch.int64 if key.endswith("position_ids") else half
        shapes[key] = (shape, dtype)
    return shapes


def write_checkpoint(
    path: Path, shapes: Shapes, seed: int, metadata: dict[str, str] | None = None
) -> Path:
    """Fill ``shapes`` with seeded random values and write them tensor by tensor."""
    layout = [OutputTensor(k, CODES[dt], s) for k, (s, dt) in shapes.items()]
    writer = StreamingWriter(path, layout, metadata or {})
    gen = torch.Generator().manual_seed(seed)
    for t in layout:
        shape, dtype = shapes[t.name]
        if dtype.is_floating_point:
            value = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(0.02).to(dtype)
        else:
            value = torch.arange(77, dtype=dtype).reshape(shape)
        writer.write(t.name, value)
    writer.close()
    return path
