"""Exports load back in diffusers (and name what A1111 reads) with the trained model's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionPipeline
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

from difftrain.api.training import BaseModelSpec
from difftrain.merge.lora import TargetIndex
from difftrain.merge.lora import modules as lora_modules
from difftrain.models import Components, build_tiny_pipeline_folder, file_sha256, load_base_model
from difftrain.models.exports import (
    export_diffusers,
    export_lora_kohya,
    export_lora_peft,
    export_single_file,
)
from difftrain.models.safetensors_meta import read_metadata
from tests.weights import assert_outputs_close, assert_same_weights

METADATA = {
    "difftrain.recipe": json.dumps({"method": "lora", "learningRate": 1e-4}),
    "difftrain.base_model_sha256": "ab" * 32,
}
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.0.proj", "conv1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_pipeline_folder(tmp_path_factory.mktemp("tiny") / "model")


def load(folder: Path, work: Path) -> Components:
    return load_base_model(BaseModelSpec(uri=str(folder)), None, work_dir=work)


def perturb_lora(module: torch.nn.Module, seed: int) -> None:
    """LoRA B factors start at zero; give them values so the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.1


@pytest.fixture
def adapted(tiny: Path, tmp_path: Path) -> Components:
    """Tiny components with LoRA adapters (alpha != rank) on the UNet and the text encoder."""
    c = load(tiny, tmp_path / "base")
    c.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, init_lora_weights="gaussian")
    )
    # transformers' own add_adapter needs a newer peft than there is; peft's injection is the same
    inject_adapter_in_model(
        LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"]), c.text_encoder
    )
    perturb_lora(c.unet, 1)
    perturb_lora(c.text_encoder, 2)
    return c


def unet_out(unet: torch.nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 32, 32, generator=gen)
    context = torch.randn(2, 77, 32, generator=gen)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 700]), context).sample  # type: ignore[no-any-return]


def text_out(c: Components, text_encoder: torch.nn.Module) -> torch.Tensor:
    ids = c.tokenizer(
        ["a red circle", "sks dog on a green background"],
        padding="max_length",
        max_length=77,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]  # type: ignore[no-any-return]


def assert_metadata(path: Path) -> None:
    meta = read_metadata(path)
    for key, value in METADATA.items():
        assert meta[key] == value, (path, key)


def test_diffusers_folder_loads_back_with_the_same_outputs(tiny: Path, tmp_path: Path) -> None:
    c = load(tiny, tmp_path / "w")
    trained = load(build_tiny_pipeline_folder(tmp_path / "t", seed=9), tmp_path / "w2").unet
    out = export_diffusers(c, tmp_path / "out", unet=trained, metadata=METADATA)
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert_same_weights(pipe.unet, trained)
    assert_same_weights(pipe.text_encoder, c.text_encoder)
    assert_outputs_close(unet_out(pipe.unet), unet_out(trained))
    assert_outputs_close(text_out(c, pipe.text_encoder), text_out(c, c.text_encoder))
    files = sorted(out.rglob("*.safetensors"))
    assert {f.parent.name for f in files} == {"unet", "vae", "text_encoder"}
    for path in files:
        assert_metadata(path)
    assert not list(out.rglob("*.bin"))


def test_diffusers_export_merges_lora_adapters(adapted: Components, tmp_path: Path) -> None:
    out = export_diffusers(adapted, tmp_path / "merged")
    pipe = StableDiffusionPipeline.from_pretrained(out)
    torch.testing.assert_close(unet_out(pipe.unet), unet_out(adapted.unet), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        text_out(adapted, pipe.text_encoder),
        text_out(adapted, adapted.text_encoder),
        atol=1e-4,
        rtol=0,
    )
    # the training model keeps its adapters
    assert any("lora_A" in name for name, _ in adapted.unet.named_parameters())


def test_controlnet_folder_loads_back(tiny: Path, tmp_path: Path) -> None:
    c = load(tiny, tmp_path / "w")
    controlnet = ControlNetModel.from_unet(c.unet, conditioning_embedding_out_channels=(16, 32))
    gen = torch.Generator().manual_seed(4)
    for param in controlnet.controlnet_down_blocks.parameters():
        param.data = torch.randn(param.shape, generator=gen) * 0.1
    out = export_diffusers(c, tmp_path / "cn", controlnet=controlnet, metadata=METADATA)
    loaded = ControlNetModel.from_pretrained(out)
    args = (
        torch.randn(1, 4, 32, 32, generator=gen),
        torch.tensor([50]),
        torch.randn(1, 77, 32, generator=gen),
        torch.rand(1, 3, 64, 64, generator=gen),
    )
    with torch.no_grad():
        ours = controlnet(*args, return_dict=False)
        theirs = loaded(*args, return_dict=False)
    assert_same_weights(loaded, controlnet)
    for a, b in zip(ours[0], theirs[0], strict=True):
        assert_outputs_close(b, a)
    assert_metadata(out / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("linear", [False, True], ids=["sd1", "sd2"])
def test_single_file_loads_back_in_diffusers_from_single_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, linear: bool
) -> None:
    """Acceptance: diffusers' from_single_file, offline, with the model's folder as config."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prediction = "v_prediction" if linear else "epsilon"
    folder = build_tiny_pipeline_folder(
        tmp_path / "tiny", use_linear_projection=linear, prediction_type=prediction
    )
    c = load(folder, tmp_path / "w")
    trained = load(build_tiny_pipeline_folder(tmp_path / "t", seed=3), tmp_path / "w2")
    unet = trained.unet if not linear else c.unet
    path = export_single_file(
        c, tmp_path / "model.safetensors", unet=unet, metadata=METADATA, dtype=torch.float32
    )
    assert_metadata(path)
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(folder))
    assert_outputs_close(unet_out(pipe.unet), unet_out(unet))
    assert_outputs_close(text_out(c, pipe.text_encoder), text_out(c, c.text_encoder))
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert_outputs_close(
            pipe.vae(images, sample_posterior=False).sample,
            c.vae(images, sample_posterior=False).sample,
        )
    assert pipe.scheduler.config["prediction_type"] == prediction
    keys = load_file(path).keys()
    assert ("v_pred" in keys) == linear
    prefix = "cond_stage_model.model." if linear else "cond_stage_model.transformer.text_model."
    assert any(k.startswith(prefix) for k in keys)


OPEN_CLIP = "cond_stage_model.model."


def test_sd2_single_file_has_the_open_clip_keys_and_carries_the_bases_extras(
    tmp_path: Path,
) -> None:
    """A1111 and ComfyUI build SD2's text tower as OpenCLIP (its last block and text_projection
    included) and read those keys: an export from a diffusers base writes the projection (the
    identity: SD2 conditions on hidden states), one from a single file that has them carries the
    base's own tensors, bitwise."""
    folder = build_tiny_pipeline_folder(
        tmp_path / "tiny", use_linear_projection=True, prediction_type="v_prediction"
    )
    c = load(folder, tmp_path / "w")
    layers = c.text_encoder.config.num_hidden_layers
    width = c.text_encoder.config.hidden_size
    first = export_single_file(
        c, tmp_path / "from-folder.safetensors", metadata=METADATA, dtype=torch.float32
    )
    tensors = load_file(first)
    assert torch.equal(tensors[OPEN_CLIP + "text_projection"], torch.eye(width))
    blocks = {
        k.split(".")[4] for k in tensors if k.startswith(OPEN_CLIP + "transformer.resblocks.")
    }
    assert blocks == {str(i) for i in range(layers)}

    # a single-file base with OpenCLIP's whole tower: one block more, a learned projection
    gen = torch.Generator().manual_seed(11)
    last = f"{OPEN_CLIP}transformer.resblocks.{layers}."
    extras = {
        last + k[len(f"{OPEN_CLIP}transformer.resblocks.{layers - 1}.") :]: torch.randn(
            v.shape, generator=gen
        )
        for k, v in tensors.items()
        if k.startswith(f"{OPEN_CLIP}transformer.resblocks.{layers - 1}.")
    }
    extras[OPEN_CLIP + "text_projection"] = torch.randn(width, width, generator=gen)
    extras[OPEN_CLIP + "logit_scale"] = torch.tensor(4.6052)
    base = tmp_path / "openclip-base.safetensors"
    save_file({**tensors, **extras}, str(base), metadata=read_metadata(first))
    loaded = load_base_model(BaseModelSpec(uri=str(base)), None, work_dir=tmp_path / "w3")
    assert loaded.text_encoder.config.num_hidden_layers == layers
    again = load_file(
        export_single_file(
            loaded, tmp_path / "from-file.safetensors", metadata=METADATA, dtype=torch.float32
        )
    )
    for key, value in extras.items():
        assert torch.equal(again[key], value), key


def test_single_file_default_dtype_is_fp16(tiny: Path, tmp_path: Path) -> None:
    c = load(tiny, tmp_path / "w")
    path = export_single_file(c, tmp_path / "half.safetensors", metadata=METADATA)
    dtypes = {v.dtype for k, v in load_file(path).items() if not k.endswith("position_ids")}
    assert dtypes == {torch.float16}
    assert len(file_sha256(path)) == 64


def test_lora_peft_layout_loads_with_load_lora_weights(
    adapted: Components, tiny: Path, tmp_path: Path
) -> None:
    path = export_lora_peft(
        adapted.unet, tmp_path / "lora.safetensors", text_encoder=adapted.text_encoder,
        metadata=METADATA,
    )  # fmt: skip
    assert_metadata(path)
    unet_only = export_lora_peft(adapted.unet, tmp_path / "unet.safetensors", metadata=METADATA)
    base = StableDiffusionPipeline.from_pretrained(tiny)
    before = unet_out(base.unet)
    base.load_lora_weights(str(unet_only))
    expected = unet_out(adapted.unet)
    assert (expected - before).abs().max() > 0.1  # the adapter matters
    torch.testing.assert_close(unet_out(base.unet), expected, atol=1e-4, rtol=0)
    # the text encoder part: what diffusers does for it (transformers' PEFT hook needs a newer
    # peft than exists here), from the file's own adapter config and weights
    tensors = load_file(path)
    config = json.loads(read_metadata(path)["lora_adapter_metadata"])
    te_config = {k[len("text_encoder.") :]: v for k, v in config.items() if k.startswith("text_")}
    te_state = {
        k[len("text_encoder.text_model.") :]: v
        for k, v in tensors.items()
        if k.startswith("text_encoder.")
    }
    fresh = CLIPTextModel.from_pretrained(tiny / "text_encoder")
    lora_config = LoraConfig(**{k: v for k, v in te_config.items() if k != "peft_type"})
    inject_adapter_in_model(lora_config, fresh)
    result = set_peft_model_state_dict(fresh, te_state)
    assert not result.unexpected_keys
    torch.testing.assert_close(
        text_out(adapted, fresh), text_out(adapted, adapted.text_encoder), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("alpha", [1.0, 8.0])
def test_lora_kohya_layout_loads_with_load_lora_weights(
    adapted: Components, tiny: Path, tmp_path: Path, alpha: float
) -> None:
    path = export_lora_kohya(
        adapted.unet, tmp_path / "kohya.safetensors", alpha=alpha, metadata=METADATA
    )
    assert_metadata(path)
    tensors = load_file(path)
    assert all(k.startswith("lora_unet_") for k in tensors)
    assert {v.item() for k, v in tensors.items() if k.endswith(".alpha")} == {alpha}
    pipe = StableDiffusionPipeline.from_pretrained(tiny)
    pipe.load_lora_weights(str(path))
    torch.testing.assert_close(unet_out(pipe.unet), unet_out(adapted.unet), atol=1e-4, rtol=0)


def test_kohya_names_resolve_in_an_ldm_checkpoint(adapted: Components, tmp_path: Path) -> None:
    """Every kohya module (UNet and text encoder) names a weight of the A1111 single file."""
    path = export_lora_kohya(
        adapted.unet, tmp_path / "k.safetensors", text_encoder=adapted.text_encoder,
        alpha=4, metadata=METADATA,
    )  # fmt: skip
    single = export_single_file(adapted, tmp_path / "m.safetensors", metadata=METADATA)
    keys = set(load_file(path))
    index = TargetIndex(set(load_file(single)), "ldm", "sd1")
    found = lora_modules(keys, "lora_kohya")
    assert any(name.startswith("lora_te_") for name in found)
    unresolved = [name for name in found if index.target(name) is None]
    assert unresolved == []
