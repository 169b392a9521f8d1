"""Base models load from diffusers folders and LDM single files; bad sources give clear errors."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from difftrain.api.training import BaseModelSpec
from difftrain.models import Components, ModelError, build_tiny_pipeline_folder, load_base_model
from difftrain.models.exports import export_single_file
from difftrain.models.ldm import text_to_ldm, unet_to_ldm, vae_to_ldm
from difftrain.models.ldm_configs import text_config, unet_config, vae_config
from difftrain.models.safetensors_meta import read_metadata, save_safetensors
from tests.sd_checkpoints import CLIP_L, SD2_UNET, SD15_UNET, SD_VAE, checkpoint_shapes
from tests.weights import assert_outputs_close, assert_same_weights


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_pipeline_folder(tmp_path_factory.mktemp("tiny") / "model")


def load(uri: str | Path, tmp_path: Path, **spec: object) -> Components:
    return load_base_model(BaseModelSpec(uri=str(uri), **spec), None, work_dir=tmp_path / "work")


def outputs(c: Components) -> dict[str, torch.Tensor]:
    """The three networks' outputs on fixed inputs."""
    gen = torch.Generator().manual_seed(7)
    latents = torch.randn(2, 4, 32, 32, generator=gen)
    context = torch.randn(2, 77, c.unet.config.cross_attention_dim, generator=gen)
    images = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    ids = c.tokenizer(
        ["a red circle on a blue background", "sks dog"],
        padding="max_length",
        max_length=77,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        return {
            "unet": c.unet(latents, torch.tensor([10, 500]), context).sample,
            "vae": c.vae(images, sample_posterior=False).sample,
            "text": c.text_encoder(ids)[0],
        }


def test_diffusers_folder_loads(tiny: Path, tmp_path: Path) -> None:
    c = load(tiny, tmp_path)
    assert (c.family, c.prediction_type, c.source) == ("sd1", "epsilon", str(tiny))
    assert c.noise_scheduler.config["num_train_timesteps"] == 1000
    assert c.scheduler_config["beta_schedule"] == "scaled_linear"
    assert c.text_encoder.config.vocab_size == len(c.tokenizer)
    again = load(tiny, tmp_path / "again")
    assert again.identity == c.identity and len(c.identity) == 64
    other = load(build_tiny_pipeline_folder(tmp_path / "other", seed=5), tmp_path / "o")
    assert other.identity != c.identity


def test_dtype_is_applied(tiny: Path, tmp_path: Path) -> None:
    c = load_base_model(BaseModelSpec(uri=str(tiny)), None, work_dir=tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for m in (c.unet, c.vae, c.text_encoder) for p in m.parameters()} == {
        torch.bfloat16
    }


def test_prediction_type_from_scheduler_config_and_spec_override(tmp_path: Path) -> None:
    v = build_tiny_pipeline_folder(tmp_path / "v", prediction_type="v_prediction")
    c = load(v, tmp_path / "a")
    assert c.prediction_type == "v_prediction"
    assert c.noise_scheduler.config["prediction_type"] == "v_prediction"
    forced = load(v, tmp_path / "b", prediction_type="epsilon")
    assert forced.prediction_type == "epsilon"
    assert forced.noise_scheduler.config["prediction_type"] == "epsilon"
    assert forced.scheduler_config["prediction_type"] == "epsilon"


def test_missing_folder_names_the_uri(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"baseModel.uri .*nowhere: no such folder"):
        load(tmp_path / "nowhere", tmp_path)
    with pytest.raises(ModelError, match=r"baseModel.uri .*gone.safetensors: no such file"):
        load(tmp_path / "gone.safetensors", tmp_path)


def test_folder_without_model_index_is_refused(tiny: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(tiny / "unet", tmp_path / "just-unet")
    with pytest.raises(ModelError, match="not a diffusers folder"):
        load(folder, tmp_path)


def test_pickle_file_refused_with_opt_in_hint(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not read: refused before opening")
    with pytest.raises(ModelError, match=r"pickle.*allowPickle: true"):
        load(ckpt, tmp_path)


def _pickle_folder(tiny: Path, dest: Path) -> Path:
    """The tiny folder with its UNet saved as pytorch_model .bin only."""
    folder = shutil.copytree(tiny, dest)
    unet = UNet2DConditionModel.from_pretrained(tiny / "unet")
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet", safe_serialization=False)
    assert not list((folder / "unet").glob("*.safetensors"))
    return folder


def test_folder_with_only_bin_weights_refused_then_allowed(tiny: Path, tmp_path: Path) -> None:
    folder = _pickle_folder(tiny, tmp_path / "bin")
    with pytest.raises(ModelError, match=r"unet/ holds only pickle weights.*allowPickle: true"):
        load(folder, tmp_path)
    allowed = load(folder, tmp_path / "ok", allow_pickle=True)
    reference = load(tiny, tmp_path / "ref")
    torch.testing.assert_close(outputs(allowed)["unet"], outputs(reference)["unet"])


def test_an_sdxl_folder_loads_and_the_refiner_is_refused(tmp_path: Path) -> None:
    from difftrain.models.tiny_sdxl import build_tiny_sdxl_pipeline_folder

    folder = build_tiny_sdxl_pipeline_folder(tmp_path / "xl")
    components = load(folder, tmp_path / "w1")
    assert components.family == "sdxl"
    assert components.text_encoder_2 is not None and components.tokenizer_2 is not None
    # the refiner: bigG alone (no text_encoder/), its time ids carry an aesthetic score
    refiner = shutil.copytree(folder, tmp_path / "refiner")
    shutil.rmtree(refiner / "text_encoder")
    shutil.rmtree(refiner / "tokenizer")
    with pytest.raises(ModelError, match=r"the SDXL refiner .*train an SDXL base model"):
        load(refiner, tmp_path / "w2")
    # tokenizer_2/ missing is named
    shutil.rmtree(folder / "tokenizer_2")
    with pytest.raises(ModelError, match=r"no tokenizer_2/"):
        load(folder, tmp_path / "w3")


def test_variant_missing_is_explained(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"no weight files \(variant 'fp16'\).*unset baseModel"):
        load(tiny, tmp_path, variant="fp16")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_hub_id_offline_gives_model_error(tmp_path: Path) -> None:
    spec = BaseModelSpec(hub="org/some-model")
    with pytest.raises(ModelError) as info:
        load_base_model(
            spec, None, work_dir=tmp_path, hub_endpoint=f"http://127.0.0.1:{_closed_port()}"
        )
    message = str(info.value)
    assert "baseModel.hub 'org/some-model': cannot reach the model hub" in message
    assert "set baseModel.uri instead" in message and "Traceback" not in message


# --------------------------------------------------------------------------------------------
# single files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("linear", "prediction"), [(False, "epsilon"), (True, "v_prediction")], ids=["sd1", "sd2"]
)
def test_single_file_round_trip_gives_the_same_outputs(
    tmp_path: Path, linear: bool, prediction: str
) -> None:
    folder = build_tiny_pipeline_folder(
        tmp_path / "tiny", use_linear_projection=linear, prediction_type=prediction
    )
    original = load(folder, tmp_path / "a")
    path = export_single_file(
        original, tmp_path / "model.safetensors", metadata={}, dtype=torch.float32
    )
    loaded = load(path, tmp_path / "b")
    assert (loaded.family, loaded.prediction_type) == (original.family, prediction)
    assert loaded.scheduler_config["beta_schedule"] == "scaled_linear"
    for part in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(loaded, part), getattr(original, part))
    ours, theirs = outputs(original), outputs(loaded)
    for name in ours:
        assert_outputs_close(theirs[name], ours[name])
    assert (
        loaded.tokenizer("a red circle").input_ids == original.tokenizer("a red circle").input_ids
    )


def test_single_file_without_recorded_configs_infers_them_from_shapes(
    tiny: Path, tmp_path: Path
) -> None:
    original = load(tiny, tmp_path / "a")
    exported = export_single_file(
        original, tmp_path / "full.safetensors", metadata={}, dtype=torch.float32
    )
    from safetensors.torch import load_file

    bare = tmp_path / "models" / "bare.safetensors"
    meta = {k: v for k, v in read_metadata(exported).items() if not k.startswith("difftrain.")}
    save_safetensors(load_file(exported), bare, meta)
    with pytest.raises(ModelError, match=r"carries no tokenizer.*tokenizerUri.*models/tokenizer/"):
        load(bare, tmp_path / "b")
    # the tokenizer from anywhere, named in the spec
    original.tokenizer.save_pretrained(tmp_path / "elsewhere" / "clip-tokenizer")
    named = load(bare, tmp_path / "n", tokenizer_uri=str(tmp_path / "elsewhere" / "clip-tokenizer"))
    assert named.tokenizer.get_vocab() == original.tokenizer.get_vocab()
    with pytest.raises(ModelError, match=r"baseModel.tokenizerUri .*elsewhere: no tokenizer there"):
        load(bare, tmp_path / "m", tokenizer_uri=str(tmp_path / "elsewhere"))
    # or beside the file
    original.tokenizer.save_pretrained(tmp_path / "models" / "tokenizer")
    loaded = load(bare, tmp_path / "c")
    # head and group counts are not in the weights; the weights themselves must all be in place
    for ours, theirs in (
        (original.unet, loaded.unet),
        (original.vae, loaded.vae),
        (original.text_encoder, loaded.text_encoder),
    ):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)


def test_sd2_single_file_without_prediction_type_asks_for_it(tmp_path: Path) -> None:
    folder = build_tiny_pipeline_folder(tmp_path / "tiny", use_linear_projection=True)
    exported = export_single_file(
        load(folder, tmp_path / "a"), tmp_path / "m.safetensors", metadata={}
    )
    from safetensors.torch import load_file

    bare = tmp_path / "bare.safetensors"
    meta = {k: v for k, v in read_metadata(exported).items() if k != "modelspec.prediction_type"}
    save_safetensors(load_file(exported), bare, meta)
    with pytest.raises(ModelError, match=r"set baseModel\.predictionType"):
        load(bare, tmp_path / "b")
    assert load(bare, tmp_path / "c", prediction_type="v_prediction").family == "sd2"


def test_non_checkpoint_safetensors_refused(tmp_path: Path) -> None:
    path = tmp_path / "random.safetensors"
    save_safetensors({"weight": torch.zeros(2, 2)}, path, {})
    with pytest.raises(ModelError, match="not an SD1/SD2 checkpoint in the LDM layout"):
        load(path, tmp_path)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        load(broken, tmp_path)


def _shapes(family: str) -> dict[str, tuple[int, ...]]:
    return {k: shape for k, (shape, _) in checkpoint_shapes(family).items()}


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_configs_inferred_from_real_sd_shapes(family: str) -> None:
    """On the real SD1.5/SD2 key sets, inferred configs build models with exactly those tensors."""
    shapes = _shapes(family)
    unet = unet_config(shapes, family)
    expected = SD15_UNET if family == "sd1" else SD2_UNET
    for key in (
        "block_out_channels",
        "layers_per_block",
        "cross_attention_dim",
        "down_block_types",
        "up_block_types",
        "attention_head_dim",
    ):
        assert unet[key] == expected[key], key
    assert unet["use_linear_projection"] == (family == "sd2")
    vae = vae_config(shapes)
    assert vae["block_out_channels"] == SD_VAE["block_out_channels"]
    text = text_config(shapes, family)
    if family == "sd1":
        assert {k: text[k] for k in CLIP_L} == CLIP_L
    else:
        # SD2 conditions on the penultimate of OpenCLIP-H's 24 blocks
        assert (text["hidden_size"], text["num_hidden_layers"], text["hidden_act"]) == (
            1024,
            23,
            "gelu",
        )
    with torch.device("meta"):
        unet_state = UNet2DConditionModel(**unet).state_dict()
        vae_state = AutoencoderKL(**vae).state_dict()
        text_state = CLIPTextModel(CLIPTextConfig(**text)).state_dict()
    mapped = {
        **{k: tuple(v.shape) for k, v in unet_to_ldm(unet_state).items()},
        **{k: tuple(v.shape) for k, v in vae_to_ldm(vae_state).items()},
        **{k: tuple(v.shape) for k, v in text_to_ldm(text_state, family).items()},
    }
    file_shapes = {k: v for k, v in shapes.items() if not k.endswith("position_ids")}
    if family == "sd2":  # the last OpenCLIP block, text_projection and logit_scale are unused
        file_shapes = {
            k: v
            for k, v in file_shapes.items()
            if ".resblocks.23." not in k and not k.endswith(("text_projection", "logit_scale"))
        }

    # tests/sd_checkpoints names SD1's text model without the text_model. that real files have
    def plain(d: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        return {k.replace(".transformer.text_model.", ".transformer."): v for k, v in d.items()}

    assert plain(mapped) == plain(file_shapes)


def test_metadata_configs_are_json(tiny: Path, tmp_path: Path) -> None:
    path = export_single_file(load(tiny, tmp_path), tmp_path / "m.safetensors", metadata={})
    meta = read_metadata(path)
    assert json.loads(meta["difftrain.config.unet"])["block_out_channels"] == [32, 64]
    assert meta["modelspec.prediction_type"] == "epsilon"


def test_pickle_checkpoint_loads_when_allowed(tiny: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    original = load(tiny, tmp_path / "a")
    exported = export_single_file(
        original, tmp_path / "m.safetensors", metadata={}, dtype=torch.float32
    )
    ckpt = tmp_path / "ckpt" / "model.ckpt"
    ckpt.parent.mkdir()
    torch.save({"state_dict": load_file(exported), "global_step": 10}, ckpt)
    original.tokenizer.save_pretrained(ckpt.parent / "tokenizer")
    with pytest.raises(ModelError, match="allowPickle"):
        load(ckpt, tmp_path / "b")
    loaded = load(ckpt, tmp_path / "c", allow_pickle=True)
    ours, theirs = original.unet.state_dict(), loaded.unet.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize(
    ("in_channels", "named"),
    [(9, "an inpainting model"), (8, "InstructPix2Pix"), (5, "depth-to-image"), (6, "6 input")],
)
def test_a_unet_that_is_not_text_to_image_is_refused_before_its_weights_are_read(
    tiny: Path, tmp_path: Path, in_channels: int, named: str
) -> None:
    folder = shutil.copytree(tiny, tmp_path / "variant")
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "in_channels": in_channels}))
    for weights in (folder / "unet").glob("*.safetensors"):
        weights.write_bytes(b"not weights")  # reading them would fail otherwise
    with pytest.raises(ModelError) as refused:
        load(folder, tmp_path)
    message = str(refused.value)
    assert named in message and f"baseModel.uri {folder}" in message
    assert "text-to-image" in message


def test_an_inpainting_single_file_is_refused_from_its_header(tiny: Path, tmp_path: Path) -> None:
    """Only the header is read: the refusal comes before any tensor (or download)."""
    from safetensors.torch import load_file

    path = export_single_file(
        load(tiny, tmp_path), tmp_path / "model.safetensors", metadata={}, dtype=torch.float32
    )
    tensors = load_file(str(path))
    key = "model.diffusion_model.input_blocks.0.0.weight"
    first = tensors[key]
    tensors[key] = torch.cat([first, first, first[:, :1]], dim=1)  # 4 + 4 + 1 channels
    inpainting = tmp_path / "inpainting.safetensors"
    save_safetensors(tensors, inpainting, {})
    data = inpainting.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    inpainting.write_bytes(data[: header_end + 16])  # the tensors cut off
    with pytest.raises(ModelError, match=r"an inpainting model \(its UNet takes 9 input"):
        load(inpainting, tmp_path)


SD15_REPO = [
    ".gitattributes",
    "README.md",
    "model_index.json",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "unet/diffusion_pytorch_model.bin",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "v1-5-pruned.safetensors",
]


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_only_the_weights_of_the_variant_in_use_are_fetched_from_the_hub(variant):
    from difftrain.models.hub import hub_files

    configs, weights = hub_files(SD15_REPO, BaseModelSpec(hub="org/sd15", variant=variant))
    infix = f".{variant}" if variant else ""
    assert weights == [
        f"unet/diffusion_pytorch_model{infix}.safetensors",
        f"vae/diffusion_pytorch_model{infix}.safetensors",
        f"text_encoder/model{infix}.safetensors",
    ]
    assert "unet/config.json" in configs and "tokenizer/vocab.json" in configs
    assert not any(f.startswith(("safety_checker/", "feature_extractor/")) for f in configs)


def test_a_hub_model_in_the_hub_cache_loads_while_the_hub_is_unreachable(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry, another rank or another job on the same cache: no second download needed."""
    cache = tmp_path / "hub-cache"
    repo = cache / "models--org--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny, repo / "snapshots" / commit)
    monkeypatch.setenv("DIFFTRAIN_HUB_CACHE", str(cache))
    offline = f"http://127.0.0.1:{_closed_port()}"
    spec = BaseModelSpec(hub="org/tiny")
    cached = load_base_model(spec, None, work_dir=tmp_path / "w", hub_endpoint=offline)
    assert cached.family == "sd1" and cached.source == "org/tiny"
    assert_same_weights(cached.unet, load(tiny, tmp_path / "direct").unet)
    with pytest.raises(ModelError, match="not in the hub cache"):
        load_base_model(
            BaseModelSpec(hub="org/other"), None, work_dir=tmp_path / "x", hub_endpoint=offline
        )
