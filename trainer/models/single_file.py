"""Loading a single-file checkpoint in the LDM layout (what A1111 and ComfyUI use) for training
(SDXL's SGM layout: :mod:`difftrain.models.single_file_sdxl`).

The networks' configs come from the file's metadata when it records them (files this package
exports do), else from the tensor shapes (:mod:`difftrain.models.ldm_configs`). A single file
carries no tokenizer: it is read from the metadata (this package's exports of small models), else
from a ``tokenizer/`` folder next to the file (``s3://b/models/tokenizer/`` for
``s3://b/models/sd15.safetensors``), else the load fails with a message saying where to put it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from difftrain.api.training import BaseModelSpec
from difftrain.models.components import Components
from difftrain.models.errors import ModelError
from difftrain.models.fetch import fetch_objects, write_atomic
from difftrain.models.ldm import (
    V_PRED_KEY,
    ldm_family,
    open_clip_extras,
    text_from_ldm,
    unet_from_ldm,
    vae_from_ldm,
)
from difftrain.models.ldm_configs import (
    SD_SCHEDULER_CONFIG,
    text_config,
    unet_config,
    vae_config,
)
from difftrain.models.safetensors_meta import read_header
from difftrain.models.variants import refuse_unsupported_unet
from difftrain.storage import StorageError, Store, is_s3, sha256_file

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CONFIG_KEY = "difftrain.config."
TOKENIZER_KEY = "difftrain.tokenizer."
# a folder with either of these is a tokenizer (transformers 5 writes only tokenizer.json)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def fetch_file(uri: str, spec: BaseModelSpec, store: Store, dest_dir: Path) -> Path:
    """The local path of the checkpoint file (downloaded when in the store); pickles refused."""
    if uri.lower().endswith(PICKLE_SUFFIXES) and not spec.allow_pickle:
        raise ModelError(
            f"baseModel.uri {uri} is a pickle checkpoint; convert it to .safetensors, or set "
            "baseModel.allowPickle: true if you trust its author (unpickling runs arbitrary code)"
        )
    if not is_s3(uri):
        path = Path(uri)
        if not path.is_file():
            raise ModelError(f"baseModel.uri {uri}: no such file")
        if path.suffix.lower() == ".safetensors":
            with path.open("rb") as head:
                check_header(read_header(head, f"baseModel.uri {uri}"), uri)
        return path
    try:
        found = store.exists(uri)
    except StorageError as exc:
        raise ModelError(f"baseModel.uri {uri}: cannot read it: {exc}") from exc
    if not found:
        raise ModelError(f"baseModel.uri {uri}: no such object in the store")

    def check_remote_header() -> None:  # the header only: refuse before the download
        if uri.lower().endswith(".safetensors"):
            with store.open_stream(uri) as head:
                check_header(read_header(head, f"baseModel.uri {uri}"), uri)

    name = uri.rsplit("/", 1)[-1]
    # once per node: the other ranks and a restarted process find the file and compare only its
    # size and ETag
    fetch_objects(store, {name: uri}, dest_dir, before_download=check_remote_header)
    return dest_dir / name


def check_header(header: dict[str, Any], uri: str) -> None:
    """Refuse SDXL and UNets that are not text-to-image from the tensor shapes in the header."""
    keys = [k for k in header if k != "__metadata__"]

    def shape(key: str) -> list[int] | None:
        entry = header.get(key)
        return list(entry.get("shape") or []) if isinstance(entry, dict) else None

    if ldm_family(keys) == "sdxl":  # its inpainting UNet and the refiner, before any download
        from difftrain.models.sdxl_refusals import refuse_unsupported_sdxl

        refuse_unsupported_sdxl(uri, {k: s for k in keys if (s := shape(k)) is not None})
        return

    first = shape("model.diffusion_model.input_blocks.0.0.weight")  # [320, in, 3, 3]
    last = shape("model.diffusion_model.out.2.weight")  # [out, 320, 3, 3]
    if first and last and len(first) == 4 and len(last) == 4:
        refuse_unsupported_unet(
            first[1],
            last[0],
            f"baseModel.uri {uri}",
            class_embeddings="model.diffusion_model.label_emb.0.0.weight" in header,
        )


def read_checkpoint(path: Path, uri: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors file, or of a pickle the user allowed."""
    if path.suffix.lower() == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = dict(handle.metadata() or {})
                return {k: handle.get_tensor(k) for k in handle.keys()}, metadata  # noqa: SIM118
        except Exception as exc:  # safetensors raises its own untyped errors for corrupt files
            raise ModelError(
                f"baseModel.uri {uri}: not a readable safetensors file: {exc}"
            ) from exc
    loaded = torch.load(path, map_location="cpu", weights_only=False)
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise ModelError(f"baseModel.uri {uri}: the pickle holds no state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, {}


def _meta_config(metadata: dict[str, str], name: str) -> dict[str, Any] | None:
    raw = metadata.get(CONFIG_KEY + name)
    return json.loads(raw) if raw else None


def _has_tokenizer(names: list[str]) -> bool:
    return any(name in names for name in TOKENIZER_FILES)


def _tokenizer_from(folder: str, store: Store, dest: Path) -> CLIPTokenizer | None:
    """The tokenizer in ``folder`` (local or in the store), or None when it holds none."""
    if not is_s3(folder):
        local = Path(folder)
        names = [p.name for p in local.iterdir() if p.is_file()] if local.is_dir() else []
        return CLIPTokenizer.from_pretrained(local) if _has_tokenizer(names) else None
    names = [u.rsplit("/", 1)[-1] for u in store.list(folder.rstrip("/") + "/")]
    if not _has_tokenizer(names):
        return None
    fetch_objects(store, {name: f"{folder.rstrip('/')}/{name}" for name in names}, dest)
    return CLIPTokenizer.from_pretrained(dest)


def _tokenizer(
    uri: str, spec: BaseModelSpec, metadata: dict[str, str], store: Store, dest: Path
) -> CLIPTokenizer:
    """The spec's tokenizerUri, else the one embedded in the header, else a sibling folder."""
    if spec.tokenizer_uri is not None:
        try:
            named = _tokenizer_from(spec.tokenizer_uri, store, dest)
        except (OSError, StorageError, ValueError) as exc:
            raise ModelError(f"baseModel.tokenizerUri {spec.tokenizer_uri}: {exc}") from exc
        if named is None:
            raise ModelError(
                f"baseModel.tokenizerUri {spec.tokenizer_uri}: no tokenizer there; it needs "
                "tokenizer.json, or vocab.json and merges.txt, with tokenizer_config.json"
            )
        return named
    embedded = {
        k[len(TOKENIZER_KEY) :]: v for k, v in metadata.items() if k.startswith(TOKENIZER_KEY)
    }
    if embedded:
        for name, text in embedded.items():
            # atomically: the ranks of a node write the same files while others read them
            write_atomic(dest / Path(name).name, text.encode("utf-8"))
        return CLIPTokenizer.from_pretrained(dest)
    sibling = uri.rsplit("/", 1)[0] + "/tokenizer" if "/" in uri else "tokenizer"
    found = _tokenizer_from(sibling, store, dest)
    if found is not None:
        return found
    raise ModelError(
        f"baseModel.uri {uri}: a single-file checkpoint carries no tokenizer; set "
        "baseModel.tokenizerUri to the model's tokenizer folder (tokenizer.json or vocab.json + "
        f"merges.txt, tokenizer_config.json), upload that folder to {sibling}/, or use the "
        "model's diffusers folder instead"
    )


def _prediction_type(
    spec: BaseModelSpec, family: str, keys: set[str], metadata: dict[str, str], uri: str
) -> str:
    if spec.prediction_type != "auto":
        return spec.prediction_type
    recorded = metadata.get("modelspec.prediction_type", "")
    if V_PRED_KEY in keys or recorded.startswith("v"):
        return "v_prediction"
    if recorded == "epsilon" or family == "sd1":
        return "epsilon"
    raise ModelError(
        f"baseModel.uri {uri}: an SD2 single file that does not record its prediction type; set "
        "baseModel.predictionType to epsilon (SD2 base, 512 px) or v_prediction (SD2 768 px)"
    )


def load_single_file(
    uri: str, spec: BaseModelSpec, store: Store, *, work_dir: Path, dtype: torch.dtype
) -> Components:
    """Load an LDM-layout checkpoint as diffusers/transformers models."""
    path = fetch_file(uri, spec, store, work_dir / "base")
    ldm, metadata = read_checkpoint(path, uri)
    keys = set(ldm)
    family = ldm_family(keys)
    if family == "sdxl":
        from difftrain.models.single_file_sdxl import load_sdxl_single_file

        return load_sdxl_single_file(
            uri,
            spec,
            store,
            path=path,
            tensors=ldm,
            metadata=metadata,
            work_dir=work_dir,
            dtype=dtype,
        )
    if family == "unknown" or not any(k.startswith("model.diffusion_model.") for k in keys):
        raise ModelError(
            f"baseModel.uri {uri}: not an SD1/SD2 checkpoint in the LDM layout (expected "
            "model.diffusion_model.*, first_stage_model.* and cond_stage_model.* tensors)"
        )
    shapes = {k: tuple(v.shape) for k, v in ldm.items()}
    try:
        unet_cfg = _meta_config(metadata, "unet") or unet_config(shapes, family)
        vae_cfg = _meta_config(metadata, "vae") or vae_config(shapes)
        text_cfg = _meta_config(metadata, "text_encoder") or text_config(shapes, family)
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(unet_cfg)
            vae = AutoencoderKL.from_config(vae_cfg)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
        unet.load_state_dict(_cast(unet_from_ldm(ldm, unet.state_dict()), dtype), assign=True)
        vae.load_state_dict(_cast(vae_from_ldm(ldm, vae.state_dict()), dtype), assign=True)
        text_state = text_from_ldm(ldm, family, text_encoder.state_dict())
        text_encoder.load_state_dict(_cast(text_state, dtype), strict=False)
    except ModelError as exc:
        raise ModelError(f"baseModel.uri {uri}: {exc}") from exc
    except (RuntimeError, ValueError) as exc:  # shape mismatches from load_state_dict
        raise ModelError(
            f"baseModel.uri {uri}: its tensors do not fit an SD1/SD2 model: {exc}"
        ) from exc
    text_encoder.to(dtype)
    prediction_type = _prediction_type(spec, family, keys, metadata, uri)
    scheduler_config = {
        **(_meta_config(metadata, "scheduler") or SD_SCHEDULER_CONFIG),
        "prediction_type": prediction_type,
    }
    from difftrain.models.loading import training_scheduler

    components = Components(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_tokenizer(uri, spec, metadata, store, work_dir / "tokenizer"),
        noise_scheduler=training_scheduler(scheduler_config, prediction_type),
        scheduler_config=scheduler_config,
        prediction_type=prediction_type,
        family=family,
        # the file's own sha256, which anyone can check with sha256sum
        identity=sha256_file(path),
        source=uri,
        ldm_extras=(
            open_clip_extras(ldm, text_encoder.config.num_hidden_layers) if family == "sd2" else {}
        ),
    )
    logger.info(
        "single-file base model loaded",
        extra={"source": uri, "family": family, "prediction_type": prediction_type},
    )
    return components


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
