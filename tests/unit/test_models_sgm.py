"""SDXL diffusers <-> SGM single-file layout, checked against diffusers' own single-file loader."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from difftrain.merge.arch import describe
from difftrain.merge.tensorio import read_header
from difftrain.models.errors import ModelError
from difftrain.models.sgm import SDXLStateDicts, sdxl_to_sgm, sgm_to_sdxl
from difftrain.models.tiny_sdxl import build_tiny_sdxl_pipeline_folder
from difftrain.storage import LocalStore


class TinySDXL:
    def __init__(self, folder: Path, states: SDXLStateDicts, file: Path) -> None:
        self.folder, self.states, self.file = folder, states, file


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinySDXL:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    root = tmp_path_factory.mktemp("sgm")
    folder = build_tiny_sdxl_pipeline_folder(root / "xl")
    states = SDXLStateDicts(
        unet=UNet2DConditionModel.from_pretrained(folder / "unet").state_dict(),
        vae=AutoencoderKL.from_pretrained(folder / "vae").state_dict(),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder").state_dict(),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
            folder / "text_encoder_2"
        ).state_dict(),
    )
    file = root / "xl.safetensors"
    save_file(sdxl_to_sgm(*states), str(file))
    return TinySDXL(folder, states, file)


def _assert_bitwise_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    want = {k: v for k, v in want.items() if not k.endswith("position_ids")}
    got = {k: v for k, v in got.items() if not k.endswith("position_ids")}
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert torch.equal(got[key], value), key


def test_round_trip_through_sgm_is_bitwise_equal_for_every_component(tiny: TinySDXL) -> None:
    sgm = sdxl_to_sgm(*tiny.states)
    back = sgm_to_sdxl(
        sgm,
        unet_keys=tiny.states.unet,
        vae_keys=tiny.states.vae,
        text_keys=tiny.states.text_encoder,
        text_2_keys=tiny.states.text_encoder_2,
    )
    for name in SDXLStateDicts._fields:
        _assert_bitwise_equal(getattr(back, name), getattr(tiny.states, name))


def test_exported_file_loads_with_diffusers_single_file_loader_bitwise(tiny: TinySDXL) -> None:
    from diffusers import StableDiffusionXLPipeline

    # diffusers' own SGM -> diffusers converters are the independent reference; passing the tiny
    # folder as config keeps it offline (the tiny towers are too shallow for its xl_base sniffing).
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(tiny.file), config=str(tiny.folder), local_files_only=True
    )
    for name in SDXLStateDicts._fields:
        _assert_bitwise_equal(getattr(pipe, name).state_dict(), getattr(tiny.states, name))


def test_exported_keys_are_the_sgm_layouts_names(tiny: TinySDXL) -> None:
    keys = set(read_header(LocalStore(), str(tiny.file)).tensors)
    # Names as they appear in SDXL base files. The tiny UNet has two levels of one resnet each
    # (SDXL: three of two), so its first attention sits in input_blocks.3 rather than 4, with
    # transformer depth 2 there; the tiny VAE's decoder still has up.0.block.0.
    expected = {
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.label_emb.0.2.bias",
        "model.diffusion_model.time_embed.0.weight",
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
        "model.diffusion_model.input_blocks.2.0.op.weight",
        "model.diffusion_model.input_blocks.3.1.proj_in.weight",
        "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.1.ff.net.0.proj.weight",
        "model.diffusion_model.output_blocks.1.2.conv.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.decoder.up.0.block.0.conv1.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "first_stage_model.post_quant_conv.weight",
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
        "conditioner.embedders.1.model.transformer.resblocks.1.mlp.c_fc.bias",
        "conditioner.embedders.1.model.text_projection",
        "conditioner.embedders.1.model.positional_embedding",
        "conditioner.embedders.1.model.token_embedding.weight",
        "conditioner.embedders.1.model.ln_final.weight",
    }
    assert expected <= keys, sorted(expected - keys)
    assert all(
        k.startswith(("model.diffusion_model.", "first_stage_model.", "conditioner.embedders."))
        for k in keys
    )


def test_open_clip_projection_is_stored_as_the_transposed_matrix(tiny: TinySDXL) -> None:
    sgm = sdxl_to_sgm(*tiny.states)
    weight = tiny.states.text_encoder_2["text_projection.weight"]  # (projection, width)
    projection = sgm["conditioner.embedders.1.model.text_projection"]
    assert projection.shape == (weight.shape[1], weight.shape[0])
    x = torch.randn(3, weight.shape[1])
    # OpenCLIP computes x @ P; the Linear computes x @ W.T (same products, other summation order)
    assert torch.allclose(x @ projection, torch.nn.functional.linear(x, weight), atol=1e-5)
    # the fused q/k/v projection holds the three in OpenCLIP's order
    fused = sgm["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"]
    q = tiny.states.text_encoder_2["text_model.encoder.layers.0.self_attn.q_proj.weight"]
    v = tiny.states.text_encoder_2["text_model.encoder.layers.0.self_attn.v_proj.weight"]
    assert torch.equal(fused[: q.shape[0]], q) and torch.equal(fused[-v.shape[0] :], v)


def test_merge_arch_recognises_the_exported_file_as_sdxl(tiny: TinySDXL) -> None:
    info = describe(read_header(LocalStore(), str(tiny.file)))
    assert info.layout == "ldm" and info.family == "sdxl" and info.in_channels == 4
    assert info.components == ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.mark.parametrize(
    ("dropped", "component"),
    [
        ("conditioner.embedders.1.model.text_projection", "text encoder 2 (OpenCLIP)"),
        ("model.diffusion_model.label_emb.0.0.weight", "UNet"),
        ("conditioner.embedders.0.transformer.text_model.final_layer_norm.bias", "CLIP-L"),
        ("first_stage_model.decoder.up.0.block.0.conv1.weight", "VAE"),
    ],
)
def test_missing_sgm_tensor_is_a_model_error_naming_it(
    tiny: TinySDXL, dropped: str, component: str
) -> None:
    sgm = sdxl_to_sgm(*tiny.states)
    del sgm[dropped]
    with pytest.raises(ModelError, match=re.escape(component)) as err:
        sgm_to_sdxl(
            sgm,
            unet_keys=tiny.states.unet,
            vae_keys=tiny.states.vae,
            text_keys=tiny.states.text_encoder,
            text_2_keys=tiny.states.text_encoder_2,
        )
    assert dropped in str(err.value)
