"""Final exports: the trained weights in the formats the spec asks for, committed to the store."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from difftrain.api import DiffusionTrainingJobSpec, ExportedFile
from difftrain.storage import Store, commit, commit_file, join

EXPORT_FOLDER = "export"


def _folder_files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def _commit_folder(store: Store, prefix: str, folder: Path, metadata: dict[str, str]) -> str:
    """Commit a folder; its identity is the sha256 of the manifest's file list."""
    entries = commit(store, prefix, _folder_files(folder), metadata=metadata)
    listing = json.dumps([[e.name, e.sha256] for e in entries]).encode()
    return hashlib.sha256(listing).hexdigest()


def controlnet_metadata(spec: DiffusionTrainingJobSpec) -> dict[str, str]:
    """What a ControlNet export records about its conditioning (empty for other methods)."""
    if spec.controlnet is None:
        return {}
    return {
        "difftrain.controlnet.conditioning_type": spec.controlnet.conditioning_type,
        "difftrain.controlnet.conditioning_scale": str(spec.controlnet.conditioning_scale),
    }


def export_all(
    spec: DiffusionTrainingJobSpec,
    components: Any,
    trainer: Any,
    store: Store,
    work: Path,
    metadata: dict[str, str],
) -> list[ExportedFile]:
    """Write every format in ``spec.output.formats`` (EMA weights when EMA is on)."""
    from difftrain.models.exports import (
        export_diffusers,
        export_lora_kohya,
        export_lora_peft,
        export_single_file,
    )

    acc = trainer.acc
    wrapped = trainer.wrapped
    unet = acc.unwrap_model(wrapped["unet"]) if "unet" in wrapped else components.unet
    # the family's text encoders in order, the trained ones unwrapped (None: the base's)
    text_encoder = [
        acc.unwrap_model(wrapped[name]) if name in wrapped else None
        for name in trainer.inp.modules.text_encoders()
    ]
    controlnet = acc.unwrap_model(wrapped["controlnet"]) if "controlnet" in wrapped else None
    out_dir = work / "export"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    base = join(spec.output.uri, EXPORT_FOLDER)
    outputs: list[ExportedFile] = []
    ema = trainer.ema.applied() if trainer.ema is not None else contextlib.nullcontext()
    with ema:
        for fmt in spec.output_formats:
            if fmt == "diffusers":
                name = "controlnet" if controlnet is not None else "diffusers"
                folder = export_diffusers(
                    components,
                    out_dir / name,
                    unet=unet,
                    text_encoder=text_encoder,
                    controlnet=controlnet,
                    metadata={**metadata, **controlnet_metadata(spec)},
                )
                uri = join(base, name)
                digest = _commit_folder(store, uri, folder, metadata)
                outputs.append(ExportedFile(format="diffusers", uri=uri, sha256=digest))
            elif fmt == "single_file":
                path = export_single_file(
                    components,
                    out_dir / "model.safetensors",
                    unet=unet,
                    text_encoder=text_encoder,
                    metadata=metadata,
                )
                outputs.append(_commit_one(store, join(base, path.name), path, fmt, metadata))
            elif fmt == "lora_peft":
                path = export_lora_peft(
                    unet,
                    out_dir / "pytorch_lora_weights.safetensors",
                    text_encoder=text_encoder,
                    metadata=metadata,
                )
                uri = join(base, "lora", path.name)
                outputs.append(_commit_one(store, uri, path, fmt, metadata))
            elif fmt == "lora_kohya":
                assert spec.lora_alpha is not None
                path = export_lora_kohya(
                    unet,
                    out_dir / "lora_kohya.safetensors",
                    text_encoder=text_encoder,
                    alpha=spec.lora_alpha,
                    metadata=metadata,
                )
                outputs.append(_commit_one(store, join(base, path.name), path, fmt, metadata))
    shutil.rmtree(out_dir, ignore_errors=True)
    return outputs


def _commit_one(
    store: Store, uri: str, path: Path, fmt: str, metadata: dict[str, str]
) -> ExportedFile:
    from difftrain.models.exports import file_sha256

    digest = file_sha256(path)
    commit_file(store, uri, path, digest, metadata={"format": fmt})
    return ExportedFile.model_validate({"format": fmt, "uri": uri, "sha256": digest})
