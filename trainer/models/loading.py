"""Loading the base model: a diffusers folder (local or in the store), a single file, a hub id.

Only safetensors are read unless the spec opts in to pickles: unpickling a checkpoint runs any code
its author put in it. Sources are fetched into ``work_dir`` and loaded from there with the ordinary
diffusers/transformers classes, so a folder in the store and a local folder load the same way.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from difftrain.api.training import BaseModelSpec
from difftrain.models.components import Components, folder_identity
from difftrain.models.errors import ModelError
from difftrain.models.fetch import fetch_objects
from difftrain.models.variants import check_unet_config
from difftrain.storage import LocalStore, StorageError, Store, is_s3

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
COMPONENT_FOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_FOLDERS = ("text_encoder_2", "tokenizer_2")  # what an SDXL folder has besides
_WEIGHT_FOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2")
_OPT_IN = (
    "convert it to .safetensors, or set baseModel.allowPickle: true if you trust its author "
    "(unpickling runs arbitrary code)"
)


def load_base_model(
    spec: BaseModelSpec,
    store: Store | None,
    *,
    work_dir: Path,
    dtype: torch.dtype = torch.float32,
    hub_endpoint: str | None = None,
) -> Components:
    """Load the model a job's ``baseModel`` names, ready for training (on the CPU, in ``dtype``).

    ``store`` reads ``s3://`` uris (local paths need none); ``hub_endpoint`` overrides the model
    hub's address (tests point it at a closed port to act as an offline cluster).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    if spec.hub is not None:
        from difftrain.models.hub import download_hub_folder

        folder = download_hub_folder(spec, work_dir / "hub", endpoint=hub_endpoint)
        files = _check_layout(_relative_files(folder), spec, f"baseModel.hub {spec.hub!r}")
        return load_diffusers_folder(folder, spec, source=spec.hub, dtype=dtype, files=files)
    uri = spec.uri
    assert uri is not None  # the spec validates that exactly one of uri and hub is set
    store = store if store is not None else LocalStore()
    if uri.lower().endswith((".safetensors", *PICKLE_SUFFIXES)):
        from difftrain.models.single_file import load_single_file

        return load_single_file(uri, spec, store, work_dir=work_dir, dtype=dtype)
    folder, files = fetch_folder(uri, spec, store, work_dir / "base")
    return load_diffusers_folder(folder, spec, source=uri, dtype=dtype, files=files)


# --------------------------------------------------------------------------------------------
# diffusers folders
# --------------------------------------------------------------------------------------------


def _variant_of(name: str) -> str | None:
    """The weight variant in a file name: ``model.fp16.safetensors`` -> 'fp16'."""
    if m := re.search(r"\.safetensors\.index\.([^.]+)\.json$", name):
        return m.group(1)
    parts = name.split(".")
    if name.endswith(".json") or len(parts) < 3:
        return None
    return parts[-2]


def select_weight_files(names: list[str], *, variant: str | None, allow_pickle: bool) -> list[str]:
    """Of the file names in one component folder, the weights to load (safetensors preferred)."""
    weights = [
        n
        for n in names
        if n.endswith((".safetensors", *PICKLE_SUFFIXES)) or ".safetensors.index" in n
    ]
    weights = [n for n in weights if _variant_of(n) == variant]
    safe = [n for n in weights if ".safetensors" in n]
    if safe:
        return safe
    pickles = [n for n in weights if n.endswith(PICKLE_SUFFIXES) or n.endswith(".bin.index.json")]
    return pickles if allow_pickle else []


def _check_component(name: str, names: list[str], spec: BaseModelSpec, where: str) -> None:
    chosen = select_weight_files(names, variant=spec.variant, allow_pickle=spec.allow_pickle)
    if chosen:
        return
    variant = f" (variant {spec.variant!r})" if spec.variant else ""
    if select_weight_files(names, variant=spec.variant, allow_pickle=True):
        raise ModelError(
            f"{where}: {name}/ holds only pickle weights{variant} (.bin/.ckpt/.pt); " + _OPT_IN
        )
    raise ModelError(
        f"{where}: {name}/ has no weight files{variant}; expected "
        f"{name}/*.safetensors in a diffusers folder"
        + ("; unset baseModel.variant to load the default weights" if spec.variant else "")
    )


def fetch_folder(uri: str, spec: BaseModelSpec, store: Store, dest: Path) -> tuple[Path, list[str]]:
    """A diffusers folder's local path (as is, or downloaded into ``dest``) and its files to load.

    Only the components training needs are downloaded, and of their weights only the ones that
    will be loaded (safetensors, the requested variant), which matters for multi-GB folders.
    """
    if not is_s3(uri):
        folder = Path(uri)
        if not folder.is_dir():
            raise ModelError(
                f"baseModel.uri {uri}: no such folder; set it to a diffusers folder "
                "(with model_index.json) or a single .safetensors file"
            )
        files = _relative_files(folder)
        wanted = _check_layout(files, spec, f"baseModel.uri {uri}")
        _read_unet_config((folder / "unet" / "config.json").read_bytes, f"baseModel.uri {uri}")
        return folder, wanted
    prefix = uri.rstrip("/") + "/"
    try:
        uris = list(store.list(prefix))
    except StorageError as exc:
        raise ModelError(f"baseModel.uri {uri}: cannot list the folder: {exc}") from exc
    files = [u[len(prefix) :] for u in uris]
    if not files:
        raise ModelError(
            f"baseModel.uri {uri}: nothing under this prefix; upload a diffusers folder "
            "(with model_index.json) there, or point baseModel.uri at a .safetensors file"
        )
    wanted = _check_layout(files, spec, f"baseModel.uri {uri}")

    def unet_config() -> bytes:
        with store.open_stream(prefix + "unet/config.json") as src:
            data: bytes = src.read()
        return data

    where = f"baseModel.uri {uri}"
    # once per node: the other ranks and a restarted process find the copy and compare only sizes
    # and ETags; a download first checks unet/config.json in the store, before the weights move
    moved = fetch_objects(
        store,
        {name: prefix + name for name in wanted},
        dest,
        before_download=lambda: _read_unet_config(unet_config, where),
    )
    logger.info("base model fetched", extra={"uri": uri, "files": len(wanted), "downloaded": moved})
    return dest, wanted


def _relative_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _check_layout(files: list[str], spec: BaseModelSpec, where: str) -> list[str]:
    """Refuse what is not a loadable SD1/SD2 diffusers folder; return the files to fetch.

    ``where`` names the source in messages: ``baseModel.uri s3://...`` or ``baseModel.hub 'x'``.
    """
    if "model_index.json" not in files:
        singles = [f for f in files if f.endswith(".safetensors") and "/" not in f]
        hint = f" (did you mean the file {singles[0]} in it?)" if singles else ""
        raise ModelError(f"{where}: not a diffusers folder (no model_index.json){hint}")
    sdxl = any(f.startswith("text_encoder_2/") for f in files)
    if sdxl and not any(f.startswith("text_encoder/") for f in files):
        raise ModelError(
            f"{where}: the SDXL refiner (it has text_encoder_2 but no text_encoder; its time ids "
            "carry an aesthetic score); the refiner only denoises the last steps of a base "
            "model's image: train an SDXL base model instead"
        )
    wanted = ["model_index.json"]
    for name in COMPONENT_FOLDERS + (SDXL_FOLDERS if sdxl else ()):
        names = [f[len(name) + 1 :] for f in files if f.startswith(name + "/")]
        if not names:
            raise ModelError(f"{where}: the diffusers folder has no {name}/")
        if name in _WEIGHT_FOLDERS:
            _check_component(name, names, spec, where)
            keep = set(
                select_weight_files(names, variant=spec.variant, allow_pickle=spec.allow_pickle)
            )
            names = [n for n in names if n in keep or n.endswith("config.json")]
        wanted += [f"{name}/{n}" for n in names]
    return wanted


def _read_unet_config(read: Any, where: str) -> None:
    """Read ``unet/config.json`` with ``read()`` (bytes) and check it, before any weight moves."""
    try:
        config = json.loads(read())
    except (OSError, StorageError, ValueError) as exc:
        raise ModelError(f"{where}: cannot read unet/config.json: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelError(f"{where}: unet/config.json is not a JSON object")
    check_unet_config(config, where)


def _uses_safetensors(folder: Path, spec: BaseModelSpec) -> bool:
    names = [p.name for p in folder.iterdir() if p.is_file()]
    chosen = select_weight_files(names, variant=spec.variant, allow_pickle=spec.allow_pickle)
    return any(".safetensors" in n for n in chosen)


def family_of(unet: UNet2DConditionModel, *, two_encoders: bool = False) -> str:
    """'sd1', 'sd2' or 'sdxl' from the UNet's config (and whether the model has SDXL's second
    text encoder); other added conditioning is refused."""
    config = unet.config
    added = config.get("addition_embed_type")
    if added == "text_time" and two_encoders:
        return "sdxl"
    if added is not None:
        raise ModelError(
            f"baseModel: a UNet with {added!r} addition embeddings"
            + ("" if added != "text_time" else " but no second text encoder (text_encoder_2/)")
            + "; training supports SD1.x, SD2.x and SDXL base models"
        )
    return "sd2" if config.get("use_linear_projection") else "sd1"


def prediction_type_of(spec: BaseModelSpec, scheduler_config: dict[str, Any]) -> str:
    """The spec's override, else the scheduler config's prediction type (epsilon when unset)."""
    if spec.prediction_type != "auto":
        return spec.prediction_type
    value = str(scheduler_config.get("prediction_type", "epsilon"))
    if value not in {"epsilon", "v_prediction"}:
        raise ModelError(
            f"baseModel: the scheduler config's prediction_type {value!r} is not supported; set "
            "baseModel.predictionType to epsilon or v_prediction"
        )
    return value


def training_scheduler(scheduler_config: dict[str, Any], prediction_type: str) -> DDPMScheduler:
    """The DDPM training schedule from a model's scheduler config (of any scheduler class)."""
    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    scheduler: DDPMScheduler = DDPMScheduler.from_config(
        {**config, "prediction_type": prediction_type}
    )
    return scheduler


def load_diffusers_folder(
    folder: Path,
    spec: BaseModelSpec,
    *,
    source: str,
    dtype: torch.dtype,
    files: list[str] | None = None,
) -> Components:
    """Build :class:`Components` from a local diffusers folder already checked by the caller.

    ``files`` are the folder's files that are loaded, which make up its identity (all when None).
    """
    unet_dir, vae_dir, te_dir = folder / "unet", folder / "vae", folder / "text_encoder"
    variant = spec.variant
    unet = UNet2DConditionModel.from_pretrained(
        unet_dir,
        torch_dtype=dtype,
        variant=variant,
        use_safetensors=_uses_safetensors(unet_dir, spec),
    )
    two_encoders = (folder / "text_encoder_2").is_dir()
    family = family_of(unet, two_encoders=two_encoders)
    vae = AutoencoderKL.from_pretrained(
        vae_dir,
        torch_dtype=dtype,
        variant=variant,
        use_safetensors=_uses_safetensors(vae_dir, spec),
    )
    text_encoder = CLIPTextModel.from_pretrained(
        te_dir, dtype=dtype, variant=variant, use_safetensors=_uses_safetensors(te_dir, spec)
    )
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder_2 = tokenizer_2 = None
    if family == "sdxl":
        te2_dir = folder / "text_encoder_2"
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            te2_dir, dtype=dtype, variant=variant, use_safetensors=_uses_safetensors(te2_dir, spec)
        )
        tokenizer_2 = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler_config: dict[str, Any] = json.loads(scheduler_path.read_text(encoding="utf-8"))
    prediction_type = prediction_type_of(spec, scheduler_config)
    scheduler_config = {**scheduler_config, "prediction_type": prediction_type}
    components = Components(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        noise_scheduler=training_scheduler(scheduler_config, prediction_type),
        scheduler_config=scheduler_config,
        prediction_type=prediction_type,
        family=family,
        identity=folder_identity(folder, files),
        source=source,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )
    logger.info(
        "base model loaded",
        extra={"source": source, "family": family, "prediction_type": prediction_type},
    )
    return components
