"""The tiny model: a diffusers pipeline folder that loads offline, and a tokenizer for its words."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import CLIPTokenizer

from difftrain.models import (
    TINY_WORDS,
    build_tiny_components,
    build_tiny_pipeline_folder,
    write_tiny_tokenizer,
)
from difftrain.models.tiny import tiny_merges


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_pipeline_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> CLIPTokenizer:
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tiny_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(folder)


def test_tiny_words_are_one_token_each(tokenizer: CLIPTokenizer) -> None:
    for word in TINY_WORDS:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, tokenizer.convert_ids_to_tokens(ids))
    ids = {tokenizer(w, add_special_tokens=False).input_ids[0] for w in TINY_WORDS}
    assert len(ids) == len(set(TINY_WORDS))


def test_caption_tokens_and_padding(tokenizer: CLIPTokenizer) -> None:
    caption = "a red circle on a blue background"
    ids = tokenizer(caption, padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert tokenizer.model_max_length == 77 and len(ids) == 77
    words = caption.split()
    assert ids[0] == tokenizer.bos_token_id and ids[len(words) + 1] == tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(ids[1 : len(words) + 1]) == [w + "</w>" for w in words]


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40))
def test_any_text_falls_back_to_known_tokens(tokenizer: CLIPTokenizer, text: str) -> None:
    # every byte has a character token, so no text maps to the unknown token
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids or "<|endoftext|>" in text.lower()


@given(
    st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=9), max_size=25)
)
@settings(max_examples=50, deadline=None)
def test_merges_make_any_word_list_whole(words: list[str]) -> None:
    from difftrain.models.tiny import _bpe

    merges = tiny_merges(words)
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    for word in words:
        assert _bpe(word, ranks) == [word + "</w>"]


def test_folder_loads_offline_and_makes_an_image(
    tiny_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_folder)
    assert pipe.safety_checker is None
    image = pipe(
        "a red circle",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pil",
    ).images[0]
    assert image.size == (64, 64)
    index = json.loads((tiny_folder / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]


def test_folder_is_small_and_deterministic(tiny_folder: Path, tmp_path: Path) -> None:
    size = sum(p.stat().st_size for p in tiny_folder.rglob("*") if p.is_file())
    assert size < 5 << 20
    again = build_tiny_pipeline_folder(tmp_path / "again")
    other = build_tiny_pipeline_folder(tmp_path / "other", seed=1)
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (again / weights).read_bytes() == (tiny_folder / weights).read_bytes()
    assert (other / weights).read_bytes() != (tiny_folder / weights).read_bytes()


def test_prediction_type_is_written_to_the_scheduler(tmp_path: Path) -> None:
    folder = build_tiny_pipeline_folder(tmp_path / "v", prediction_type="v_prediction")
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction"


def test_components_in_memory_match_the_folder(tiny_folder: Path) -> None:
    components = build_tiny_components(prediction_type="v_prediction")
    assert components.prediction_type == "v_prediction"
    assert components.noise_scheduler.config["prediction_type"] == "v_prediction"
    assert components.family == "sd1" and len(components.identity) == 64
    pipe = StableDiffusionPipeline.from_pretrained(tiny_folder)
    sample = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    context = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = components.unet(sample, 10, context).sample
        theirs = pipe.unet(sample, 10, context).sample
    torch.testing.assert_close(ours, theirs)
    assert components.text_encoder.config.vocab_size == len(components.tokenizer)


def test_the_local_model_options_shape_its_vae_and_unet(tmp_path: Path) -> None:
    """vae_norm_groups and unet_attention (the local run's model) reach the configs, and the
    pipeline still makes 64-px images from them."""
    folder = build_tiny_pipeline_folder(
        tmp_path / "local", vae_norm_groups=1, unet_attention=(False, True)
    )
    vae = json.loads((folder / "vae" / "config.json").read_text())
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert vae["norm_num_groups"] == 1
    assert unet["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D"]
    assert unet["up_block_types"] == ["CrossAttnUpBlock2D", "UpBlock2D"]
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, output_type="pil").images[0]
    assert image.size == (64, 64)
    default = json.loads(
        (build_tiny_pipeline_folder(tmp_path / "d") / "unet" / "config.json").read_text()
    )
    assert default["down_block_types"] == ["CrossAttnDownBlock2D", "DownBlock2D"]
    with pytest.raises(ValueError, match="unet_attention: one flag per UNet level"):
        build_tiny_pipeline_folder(tmp_path / "bad", unet_attention=(True,))


def test_zero_terminal_snr_makes_the_last_timestep_pure_noise(tmp_path: Path) -> None:
    """zero_terminal_snr (the local run's model): the schedule's last timestep keeps nothing of
    the image, for the training schedule the trainer builds and for the samples' scheduler, which
    starts there; without it SD1's schedule keeps about 7% of the image's amplitude at t=999."""
    from difftrain.models.loading import training_scheduler
    from difftrain.train.sampling import build_pipeline

    folder = build_tiny_pipeline_folder(
        tmp_path / "z", prediction_type="v_prediction", zero_terminal_snr=True
    )
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert config["rescale_betas_zero_snr"] is True
    assert config["timestep_spacing"] == "trailing"
    trained = training_scheduler(config, "v_prediction")
    assert float(trained.alphas_cumprod[-1]) == 0.0
    plain = json.loads(
        (
            build_tiny_pipeline_folder(tmp_path / "p") / "scheduler" / "scheduler_config.json"
        ).read_text()
    )
    signal = float(training_scheduler(plain, "epsilon").alphas_cumprod[-1]) ** 0.5
    assert 0.05 < signal < 0.1
    components = build_tiny_components(prediction_type="v_prediction")
    components.scheduler_config = config
    pipe = build_pipeline(components, components.unet)
    pipe.scheduler.set_timesteps(20)
    assert int(pipe.scheduler.timesteps[0]) == 999
    with pytest.raises(ValueError, match="needs prediction_type='v_prediction'"):
        build_tiny_pipeline_folder(tmp_path / "e", zero_terminal_snr=True)
