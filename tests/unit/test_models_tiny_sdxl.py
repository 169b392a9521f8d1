"""The tiny SDXL folder loads as diffusers' StableDiffusionXLPipeline and runs its conditioning."""

from __future__ import annotations

from pathlib import Path

import torch

from difftrain.models.tiny_sdxl import build_tiny_sdxl_pipeline_folder


def test_tiny_sdxl_folder_loads_and_unet_uses_both_encoders_and_time_ids(tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    folder = build_tiny_sdxl_pipeline_folder(tmp_path / "xl")
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    assert pipe.unet.config.addition_embed_type == "text_time"
    # The pipeline's own prompt encoding: penultimate states of both encoders, pooled projection.
    embeds, _, pooled, _ = pipe.encode_prompt(
        "a red circle", device="cpu", do_classifier_free_guidance=False
    )
    assert embeds.shape[-1] == pipe.unet.config.cross_attention_dim
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    latents = torch.randn(1, 4, 32, 32, requires_grad=True)
    out = pipe.unet(
        latents,
        torch.tensor([10]),
        encoder_hidden_states=embeds,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
    ).sample
    out.square().mean().backward()
    assert out.shape == latents.shape and latents.grad is not None
    other = pipe.unet(
        latents,
        torch.tensor([10]),
        encoder_hidden_states=embeds,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids * 2},
    ).sample
    assert not torch.equal(out, other)  # the time ids condition the UNet


def test_tiny_sdxl_folder_is_the_same_for_the_same_seed(tmp_path: Path) -> None:
    a = build_tiny_sdxl_pipeline_folder(tmp_path / "a", seed=3)
    b = build_tiny_sdxl_pipeline_folder(tmp_path / "b", seed=3)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        name = next((a / part).glob("*.safetensors")).name
        assert (a / part / name).read_bytes() == (b / part / name).read_bytes()
