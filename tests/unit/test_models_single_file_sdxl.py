"""SDXL single files in the SGM layout load for training: the networks bit for bit from this
package's exports, the configs of a real SDXL base file from its shapes alone."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from difftrain.api.training import BaseModelSpec
from difftrain.models import Components, ModelError, load_base_model
from difftrain.models.exports import export_single_file
from difftrain.models.ldm_configs import sdxl_text_configs, unet_config
from difftrain.models.single_file import check_header
from difftrain.models.tiny_sdxl import build_tiny_sdxl_pipeline_folder
from tests.sd_checkpoints import CLIP_L, SDXL_UNET, checkpoint_shapes, clip_shapes, unet_shapes
from tests.weights import assert_same_weights


def _load(uri: Path, work: Path, **spec: object) -> Components:
    return load_base_model(BaseModelSpec(uri=str(uri), **spec), None, work_dir=work)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl_pipeline_folder(tmp_path_factory.mktemp("xl") / "model")


def test_an_exported_sgm_file_loads_back_with_the_same_weights(folder: Path, tmp_path: Path):
    base = _load(folder, tmp_path / "w1")
    single = export_single_file(base, tmp_path / "xl.safetensors", metadata={}, dtype=torch.float32)
    loaded = _load(single, tmp_path / "w2")
    assert loaded.family == "sdxl" and loaded.prediction_type == "epsilon"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert_same_weights(getattr(loaded, name), getattr(base, name))
    prompt = ["a red circle on a white background"]
    for name in ("tokenizer", "tokenizer_2"):
        a, b = getattr(loaded, name), getattr(base, name)
        assert (
            a(prompt, padding="max_length").input_ids == b(prompt, padding="max_length").input_ids
        )
    assert loaded.scheduler_config["_class_name"] == base.scheduler_config["_class_name"]


def test_without_its_tokenizers_in_the_header_they_come_from_folders_beside_the_file(
    folder: Path, tmp_path: Path
):
    from safetensors.torch import load_file

    from difftrain.models.safetensors_meta import read_metadata, save_safetensors

    base = _load(folder, tmp_path / "w1")
    exported = export_single_file(base, tmp_path / "x.safetensors", metadata={})
    header = {k: v for k, v in read_metadata(exported).items() if ".tokenizer" not in k}
    bare = tmp_path / "models" / "xl.safetensors"
    bare.parent.mkdir()
    save_safetensors(load_file(exported), bare, header)
    with pytest.raises(ModelError, match=r"carries no tokenizer.*tokenizerUri"):
        _load(bare, tmp_path / "w2")
    shutil.copytree(folder / "tokenizer", bare.parent / "tokenizer")
    derived = _load(bare, tmp_path / "w3")  # tokenizer_2: the first, padding with "!"
    assert derived.tokenizer_2 is not None and derived.tokenizer_2.pad_token == "!"
    shutil.copytree(folder / "tokenizer_2", bare.parent / "tokenizer_2")
    beside = _load(bare, tmp_path / "w4")
    assert beside.tokenizer_2 is not None
    assert beside.tokenizer_2.pad_token == base.tokenizer_2.pad_token  # type: ignore[union-attr]


def test_a_real_sdxl_base_files_configs_come_from_its_shapes():
    """The shapes of SDXL base's SGM file give configs whose models have exactly its tensors."""
    shapes = {k: shape for k, (shape, _dtype) in checkpoint_shapes("sdxl").items()}
    config = unet_config(shapes, "sdxl")
    for key in (
        "block_out_channels",
        "down_block_types",
        "up_block_types",
        "transformer_layers_per_block",
        "attention_head_dim",
        "cross_attention_dim",
        "addition_embed_type",
        "addition_time_embed_dim",
        "projection_class_embeddings_input_dim",
        "layers_per_block",
        "use_linear_projection",
    ):
        assert config[key] == SDXL_UNET[key], key
    assert unet_shapes(config) == unet_shapes(SDXL_UNET)
    clip_l, big_g = sdxl_text_configs(shapes)
    assert clip_shapes(clip_l) == clip_shapes(CLIP_L)
    assert (big_g["hidden_size"], big_g["num_hidden_layers"]) == (1280, 32)
    assert (big_g["intermediate_size"], big_g["projection_dim"]) == (5120, 1280)
    assert big_g["hidden_act"] == "gelu" and clip_l["hidden_act"] == "quick_gelu"


def test_sdxl_inpainting_and_refiner_headers_are_refused_before_download():
    def header(shapes: dict) -> dict:
        return {k: {"shape": list(s), "dtype": "F16"} for k, (s, _dtype) in shapes.items()}

    check_header(header(checkpoint_shapes("sdxl")), "s3://m/xl.safetensors")  # base: fine
    with pytest.raises(ModelError, match=r"SDXL inpainting checkpoint"):
        check_header(header(checkpoint_shapes("sdxl", in_channels=9)), "s3://m/xl.safetensors")
    refiner = {
        k: v
        for k, v in checkpoint_shapes("sdxl").items()
        if not k.startswith("conditioner.embedders.0.")
    }
    refiner = {k.replace("embedders.1.", "embedders.0."): v for k, v in refiner.items()}
    with pytest.raises(ModelError, match=r"the SDXL refiner"):
        check_header(header(refiner), "s3://m/refiner.safetensors")
