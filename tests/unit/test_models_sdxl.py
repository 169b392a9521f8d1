"""SDXL's text conditioning and time ids match diffusers' own StableDiffusionXLPipeline."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from difftrain.models.errors import ModelError
from difftrain.models.sdxl import (
    SDXLText,
    TimeIdSizes,
    add_time_ids,
    added_cond_kwargs,
    batch_time_ids,
    encode_sdxl_prompts,
    load_sdxl_text,
    zero_for_dropout,
)
from difftrain.models.tiny_sdxl import build_tiny_sdxl_pipeline_folder

# The last prompt is longer than the tiny tokenizers' context, so truncation is compared too.
PROMPTS = ["a red circle", "", "a blue square on white", "red " * 40]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl_pipeline_folder(tmp_path_factory.mktemp("sdxl") / "xl", seed=5)


@pytest.fixture(scope="module")
def pipe(folder: Path) -> Any:
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(
        folder, local_files_only=True, use_safetensors=True
    )


@pytest.fixture(scope="module")
def text(folder: Path) -> SDXLText:
    return load_sdxl_text(folder)


def test_prompts_encode_as_the_sdxl_pipeline_encodes_them(text: SDXLText, pipe: Any) -> None:
    embeds, pooled = encode_sdxl_prompts(text, PROMPTS)
    with torch.no_grad():
        want_embeds, _, want_pooled, _ = pipe.encode_prompt(
            PROMPTS, device=torch.device("cpu"), do_classifier_free_guidance=False
        )
    assert embeds.shape == want_embeds.shape
    assert embeds.shape[-1] == pipe.unet.config.cross_attention_dim
    assert pooled.shape == (len(PROMPTS), pipe.text_encoder_2.config.projection_dim)
    torch.testing.assert_close(embeds, want_embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, want_pooled, rtol=1e-5, atol=1e-5)
    # The empty prompt is encoded, not zeroed: zeroing is the caption dropout's decision.
    assert embeds[1].abs().sum() > 0 and pooled[1].abs().sum() > 0


@pytest.mark.parametrize(
    ("original", "crop", "target"),
    [
        ((1024, 1024), (0, 0), (1024, 1024)),
        ((768, 1344), (32, 0), (704, 1280)),
        ((64, 48), (3, 7), (32, 32)),
    ],
)
def test_time_ids_are_the_pipelines(
    pipe: Any, original: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]
) -> None:
    want = pipe._get_add_time_ids(
        original,
        crop,
        target,
        dtype=torch.float32,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
    )
    assert want.shape == (1, 6)
    torch.testing.assert_close(add_time_ids(original, crop, target), want[0])
    torch.testing.assert_close(
        batch_time_ids([(original, crop, target), TimeIdSizes(target, (0, 0), target)]),
        torch.cat([want, torch.tensor([[*target, 0, 0, *target]], dtype=torch.float32)]),
    )


def test_unet_takes_added_cond_kwargs_and_time_ids_change_its_output(
    text: SDXLText, pipe: Any
) -> None:
    with torch.no_grad():
        embeds, pooled = encode_sdxl_prompts(text, PROMPTS[:2])
        latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        timesteps = torch.tensor([10, 500])

        def predict(time_ids: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = pipe.unet(
                latents,
                timesteps,
                encoder_hidden_states=embeds,
                added_cond_kwargs=added_cond_kwargs(pooled, time_ids),
            ).sample
            return out

        square = predict(batch_time_ids([((64, 64), (0, 0), (64, 64))] * 2))
        cropped = predict(batch_time_ids([((128, 96), (16, 8), (64, 64))] * 2))
    assert square.shape == latents.shape and torch.isfinite(square).all()
    assert not torch.allclose(square, cropped)  # the time ids reach the UNet


def test_zero_for_dropout_zeroes_exactly_the_masked_rows() -> None:
    generator = torch.Generator().manual_seed(1)
    embeds = torch.randn(4, 7, 80, generator=generator)
    pooled = torch.randn(4, 40, generator=generator)
    mask = torch.tensor([True, False, True, False])
    zeroed, zeroed_pooled = zero_for_dropout(embeds, pooled, mask)
    assert torch.equal(zeroed[mask], torch.zeros_like(embeds[mask]))
    assert torch.equal(zeroed_pooled[mask], torch.zeros_like(pooled[mask]))
    assert torch.equal(zeroed[~mask], embeds[~mask])
    assert torch.equal(zeroed_pooled[~mask], pooled[~mask])
    with pytest.raises(ValueError, match="mask shape"):
        zero_for_dropout(embeds, pooled, mask[:3])


def test_pickled_text_encoder_2_is_refused_naming_the_folder(folder: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import CLIPTextModelWithProjection

    copy = shutil.copytree(folder, tmp_path / "pickled")
    encoder_2 = copy / "text_encoder_2"
    weights = next(encoder_2.glob("*.safetensors"))
    torch.save(load_file(weights), encoder_2 / "pytorch_model.bin")
    weights.unlink()
    # The copy is loadable when pickles are allowed: the refusal is the safetensors rule's.
    CLIPTextModelWithProjection.from_pretrained(encoder_2, local_files_only=True)
    with pytest.raises(ModelError, match="safetensors") as refused:
        load_sdxl_text(copy)
    assert str(copy) in str(refused.value) and "text_encoder_2" in str(refused.value)


def test_loaded_text_parts_are_in_the_requested_dtype(folder: Path) -> None:
    text = load_sdxl_text(folder, dtype=torch.bfloat16)
    assert text.text_encoder.dtype == torch.bfloat16
    assert text.text_encoder_2.dtype == torch.bfloat16
    assert text.tokenizer.model_max_length == text.tokenizer_2.model_max_length
