"""Random-initialised diffusers folders of real model shapes, for the GPU benchmark.

``build_sd15_pipeline_folder`` writes a StableDiffusionPipeline folder with the SD1.5
architecture — UNet 860M (block_out_channels 320/640/1280/1280, cross_attention_dim 768), the SD
KL autoencoder (128/256/512/512) and the CLIP ViT-L/14 text transformer (12 layers, 768 wide,
vocabulary 49,408) — built from configs like ``difftrain.models.tiny.build_tiny_pipeline_folder``:
nothing is downloaded, the weights are random, so the figures are about compute, not quality.
The tokenizer is the tiny model's offline CLIP BPE tokenizer (its ids are a subset of the 49,408
embedding rows; captions tokenize to a handful of tokens, padded to 77 like any SD1 caption).

``SDXL_UNET_CONFIG`` is the SDXL base UNet's config, used to ask difftrain whether it trains SDXL.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD15_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
# CLIP ViT-L/14's text tower, as in SD1.5's text_encoder/config.json.
SD15_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
SD15_PARAMETERS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}

SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}


def build_sd15_pipeline_folder(path: Path, *, seed: int = 0, device: str = "cpu") -> Path:
    """Write an SD1.5-shaped diffusers folder (fp32 safetensors, about 4.3 GB) at ``path``.

    ``device`` is where the weights are initialised (a GPU does it in a second, two CPU cores in
    about a minute); they are written from the CPU either way.
    """
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from difftrain.models.tiny import TINY_SCHEDULER_CONFIG, write_tiny_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(path / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    generator_state = torch.random.get_rng_state()
    try:
        parts: dict[str, Any] = {}
        with torch.device(device):
            torch.manual_seed(seed)
            parts["unet"] = UNet2DConditionModel(**SD15_UNET_CONFIG)
            torch.manual_seed(seed + 1)
            parts["vae"] = AutoencoderKL(**SD15_VAE_CONFIG)
            torch.manual_seed(seed + 2)
            text_config = CLIPTextConfig(
                **SD15_TEXT_CONFIG,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            parts["text_encoder"] = CLIPTextModel(text_config)
    finally:
        torch.random.set_rng_state(generator_state)
    for name, module in parts.items():
        module.to("cpu").save_pretrained(path / name, safe_serialization=True)
    del parts
    DDPMScheduler(**TINY_SCHEDULER_CONFIG).save_pretrained(path / "scheduler")
    import diffusers

    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": str(diffusers.__version__),
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (path / "model_index.json").write_text(json.dumps(model_index, indent=2), encoding="utf-8")
    return path


def build_tiny_bench_folder(path: Path, *, seed: int = 0) -> Path:
    """difftrain's tiny model with a three-level VAE: 64 px images (the smallest a job takes)
    give 16 px latents, 4x fewer UNet FLOPs than the tiny model's 32 px, so the CPU smoke check
    of the benchmark runs in well under a minute on two cores."""
    import torch
    from diffusers import AutoencoderKL

    from difftrain.models.tiny import TINY_VAE_CONFIG, build_tiny_pipeline_folder

    build_tiny_pipeline_folder(path, seed=seed, sample_size=16)
    config = {
        **TINY_VAE_CONFIG,
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [16, 32, 32],
        "sample_size": 64,
    }
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**config)
    finally:
        torch.random.set_rng_state(state)
    shutil.rmtree(path / "vae")
    vae.save_pretrained(path / "vae", safe_serialization=True)
    return path


def difftrain_trains_sdxl() -> tuple[bool, str]:
    """(accepted, difftrain's message): does difftrain's loader take an SDXL-shaped UNet?"""
    from types import SimpleNamespace

    from difftrain.models.loading import family_of

    try:
        family = family_of(SimpleNamespace(config=dict(SDXL_UNET_CONFIG)))
    except Exception as exc:  # noqa: BLE001 - the refusal is the answer
        return False, str(exc)
    return True, f"accepted as family {family}"
