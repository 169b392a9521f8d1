"""A tiny Stable-Diffusion-XL-shaped model built from configs: for tests.

Same structure as SDXL base: a UNet with ``text_time`` added conditioning (pooled text embedding
plus six size/crop time ids), two text encoders (CLIP-L-shaped ``CLIPTextModel`` and
bigG-shaped ``CLIPTextModelWithProjection``) whose penultimate hidden states are concatenated as
the cross-attention context, two tokenizers (the tiny one of tiny.py), a KL autoencoder and
SDXL's Euler scheduler. Nothing is downloaded; the same seed gives the same files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from difftrain.models.tiny import (
    TINY_TEXT_CONFIG,
    TINY_VAE_CONFIG,
    _diffusers_version,
    _vocab_size,
    write_tiny_tokenizer,
)

TEXT_1_HIDDEN = 32
TEXT_2_HIDDEN = 48
TEXT_2_PROJECTION = 40
ADDITION_TIME_EMBED_DIM = 8
# SDXL: six time ids (original size, crop top-left, target size), each embedded to
# addition_time_embed_dim, concatenated with the second encoder's pooled projection.
TIME_IDS = 6

TINY_SDXL_UNET_CONFIG: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "transformer_layers_per_block": [1, 2],
    "cross_attention_dim": TEXT_1_HIDDEN + TEXT_2_HIDDEN,
    "attention_head_dim": [4, 8],
    "norm_num_groups": 16,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": ADDITION_TIME_EMBED_DIM,
    "projection_class_embeddings_input_dim": TEXT_2_PROJECTION + TIME_IDS * ADDITION_TIME_EMBED_DIM,
}
# SDXL base's scheduler config.
TINY_SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
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


def build_tiny_sdxl_pipeline_folder(path: Path, *, seed: int = 0, sample_size: int = 32) -> Path:
    """Write a complete diffusers StableDiffusionXLPipeline folder with tiny random parts."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    path.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(path / "tokenizer")
    write_tiny_tokenizer(path / "tokenizer_2")
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    ids = {
        "vocab_size": _vocab_size(path / "tokenizer"),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_SDXL_UNET_CONFIG, sample_size=sample_size)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**{**TINY_VAE_CONFIG, "sample_size": sample_size * 2})
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(**{**TINY_TEXT_CONFIG, "hidden_size": TEXT_1_HIDDEN}, **ids)
        )
        torch.manual_seed(seed + 3)
        config_2 = {
            **TINY_TEXT_CONFIG,
            "hidden_size": TEXT_2_HIDDEN,
            "intermediate_size": 2 * TEXT_2_HIDDEN,
            "projection_dim": TEXT_2_PROJECTION,
            "hidden_act": "gelu",
        }
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config_2, **ids))
    finally:
        torch.random.set_rng_state(state)
    scheduler = EulerDiscreteScheduler(**TINY_SDXL_SCHEDULER_CONFIG)

    unet.save_pretrained(path / "unet", safe_serialization=True)
    vae.save_pretrained(path / "vae", safe_serialization=True)
    text_encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
    text_encoder_2.save_pretrained(path / "text_encoder_2", safe_serialization=True)
    scheduler.save_pretrained(path / "scheduler")
    model_index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": _diffusers_version(),
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (path / "model_index.json").write_text(json.dumps(model_index, indent=2), encoding="utf-8")
    return path
