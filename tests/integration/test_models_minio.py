"""Base models load from a real MinIO: diffusers folders and single files, only what is needed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from difftrain.api.training import BaseModelSpec
from difftrain.models import ModelError, build_tiny_pipeline_folder, load_base_model
from difftrain.models.components import file_sha256
from difftrain.models.exports import export_single_file
from difftrain.models.fetch import LOCK_NAME
from difftrain.models.safetensors_meta import read_metadata, save_safetensors
from difftrain.storage import Credentials, S3Store, StoreConfig
from tests.weights import assert_outputs_close, assert_same_weights


def store(s3) -> S3Store:
    return S3Store(
        StoreConfig(
            endpoint=s3.endpoint,
            secure=False,
            credentials=Credentials(s3.access_key, s3.secret_key),
        )
    )


def upload(s3, folder: Path, prefix: str) -> None:
    target = store(s3)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            target.put_file(path, s3.uri(f"{prefix}/{path.relative_to(folder).as_posix()}"))


def unet_out(unet: torch.nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 4, 32, 32, generator=gen), 10, torch.randn(1, 77, 32, generator=gen))
    with torch.no_grad():
        return unet(*args).sample  # type: ignore[no-any-return]


def test_diffusers_folder_from_the_store(s3, tmp_path: Path) -> None:
    folder = build_tiny_pipeline_folder(tmp_path / "tiny", prediction_type="v_prediction")
    # what a hub snapshot also holds: pickle duplicates and parts training never loads
    extra = shutil.copytree(folder, tmp_path / "upload")
    pickled = tmp_path / "pickled"
    UNet2DConditionModel.from_pretrained(folder / "unet").save_pretrained(
        pickled, safe_serialization=False
    )
    shutil.copy(pickled / "diffusion_pytorch_model.bin", extra / "unet")
    (extra / "safety_checker").mkdir()
    (extra / "safety_checker" / "model.safetensors").write_bytes(b"never downloaded")
    upload(s3, extra, "models/tiny")

    work = tmp_path / "work"
    remote = load_base_model(BaseModelSpec(uri=s3.uri("models/tiny")), store(s3), work_dir=work)
    local = load_base_model(BaseModelSpec(uri=str(folder)), None, work_dir=tmp_path / "w2")
    assert remote.source == s3.uri("models/tiny")
    assert remote.prediction_type == "v_prediction" and remote.family == "sd1"
    assert remote.identity == local.identity
    assert_same_weights(remote.unet, local.unet)
    assert_outputs_close(unet_out(remote.unet), unet_out(local.unet))
    fetched = {p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file()}
    assert not [f for f in fetched if f.endswith(".bin") or "safety_checker" in f]
    assert "base/unet/diffusion_pytorch_model.safetensors" in fetched


def test_single_file_and_sibling_tokenizer_from_the_store(s3, tmp_path: Path) -> None:
    folder = build_tiny_pipeline_folder(tmp_path / "tiny")
    local = load_base_model(BaseModelSpec(uri=str(folder)), None, work_dir=tmp_path / "w")
    path = export_single_file(
        local, tmp_path / "m.safetensors", metadata={"difftrain.recipe": "{}"}, dtype=torch.float32
    )
    # without the embedded tokenizer, as for a checkpoint from elsewhere
    bare = tmp_path / "bare.safetensors"
    meta = {k: v for k, v in read_metadata(path).items() if "tokenizer" not in k}
    save_safetensors(load_file(path), bare, meta)
    store(s3).put_file(bare, s3.uri("ckpt/model.safetensors"))
    spec = BaseModelSpec(uri=s3.uri("ckpt/model.safetensors"))
    sibling = (
        r"no tokenizer; set baseModel.tokenizerUri .* upload that folder to s3://.*/ckpt/tokenizer/"
    )
    with pytest.raises(ModelError, match=sibling):
        load_base_model(spec, store(s3), work_dir=tmp_path / "r1")
    local.tokenizer.save_pretrained(tmp_path / "tok")
    upload(s3, tmp_path / "tok", "ckpt/tokenizer")
    remote = load_base_model(spec, store(s3), work_dir=tmp_path / "r2")
    assert_same_weights(remote.unet, local.unet)
    assert_outputs_close(unet_out(remote.unet), unet_out(local.unet))
    assert remote.tokenizer("a red circle").input_ids == local.tokenizer("a red circle").input_ids
    assert remote.identity == file_sha256(bare)


def test_missing_prefix_and_object_are_named(s3, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"baseModel.uri s3://.*/nothing: nothing under this"):
        load_base_model(BaseModelSpec(uri=s3.uri("nothing")), store(s3), work_dir=tmp_path)
    with pytest.raises(ModelError, match=r"baseModel.uri s3://.*/no.safetensors: no such object"):
        load_base_model(BaseModelSpec(uri=s3.uri("no.safetensors")), store(s3), work_dir=tmp_path)


def test_an_inpainting_model_in_the_store_is_refused_before_any_weight_is_downloaded(
    s3, tmp_path: Path
) -> None:
    import json

    folder = build_tiny_pipeline_folder(tmp_path / "tiny")
    single = export_single_file(
        load_base_model(BaseModelSpec(uri=str(folder)), None, work_dir=tmp_path / "l"),
        tmp_path / "sd.safetensors",
        metadata={},
        dtype=torch.float32,
    )
    config_path = folder / "unet" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "in_channels": 9}))
    upload(s3, folder, "models/inpainting")
    tensors = load_file(str(single))
    key = "model.diffusion_model.input_blocks.0.0.weight"
    tensors[key] = torch.cat([tensors[key]] * 2 + [tensors[key][:, :1]], dim=1)
    save_safetensors(tensors, tmp_path / "inpainting.safetensors", {})
    store(s3).put_file(tmp_path / "inpainting.safetensors", s3.uri("models/inpainting.safetensors"))

    for uri in (s3.uri("models/inpainting"), s3.uri("models/inpainting.safetensors")):
        work = tmp_path / "work" / uri.rsplit("/", 1)[-1]
        with pytest.raises(ModelError, match=r"an inpainting model.*text-to-image"):
            load_base_model(BaseModelSpec(uri=uri), store(s3), work_dir=work)
        files = [p for p in work.rglob("*") if p.is_file()] if work.exists() else []
        downloaded = [p for p in files if p.name != LOCK_NAME]  # the lock file is no download
        assert not downloaded, downloaded
